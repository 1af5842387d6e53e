"""The export action: a run's checkpoint over a patch source, checked before a patch is read.
A rerun refuses another run's folder and exports again the slides whose patches changed."""
import dataclasses
import functools
import hashlib
import json
import logging
import os
from typing import List, Optional

import jax
import numpy as np

from clusiam_jax import run_dir, storage, workdir_lock
from clusiam_jax.config import parse_checkpoint_choice
from clusiam_jax.data import sources as sources_lib
from clusiam_jax.data import stain_norm
from clusiam_jax.errors import ClusiamError, ConfigError, DataError
from clusiam_jax.export import format as fmt
from clusiam_jax.export import scales
from clusiam_jax.export.atlas import write_atlas
from clusiam_jax.export.embed import (
    Embedder,
    EmbedOptions,
    export_embeddings,
    group_by_slide,
    option_attrs,
)
from clusiam_jax.export.maps import check_thumbnail, draw_export_maps, write_export_geojson
from clusiam_jax.fileio import writable_folder

log = logging.getLogger('clusiam_jax')

DEFAULT_DIR = 'export'


def resolve_normalization(run: run_dir.Run, given: Optional[run_dir.Normalization]):
    """The run's normalization; `given` (command line) only for runs that recorded none."""
    recorded = run.normalization
    if recorded is not None:
        if given is not None and (tuple(given.mean), tuple(given.std)) != (recorded.mean,
                                                                           recorded.std):
            raise ConfigError(f'the run trained with mean {list(recorded.mean)} std '
                              f'{list(recorded.std)} ({recorded.origin}); export uses '
                              f'those: drop --config.data.mean/std')
        return recorded
    if given is not None:
        return given
    raise ConfigError(f'{run.workdir} records no normalization (no {run_dir.NORMALIZATION_NAME}'
                      f' and no data.mean/std in its config): pass the training statistics '
                      f'with --config.data.mean=R,G,B --config.data.std=R,G,B')


def weights_digest(variables) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes, in path order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(variables))
    digest = hashlib.sha256()
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.ascontiguousarray(leaf)
        digest.update(f'{jax.tree_util.keystr(path)}|{array.dtype.str}|{array.shape}|'.encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _same(a, b) -> bool:
    a, b = (v.decode('utf-8') if isinstance(v, bytes) else v for v in (a, b))
    if a is None or b is None:
        return a is b
    if isinstance(a, str) or isinstance(b, str):
        return str(a) == str(b)
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and bool(np.all(a == b))


def _absolute(path: str) -> str:
    """A folder as the export's files record it: a URL as given, a local path absolute."""
    return path.rstrip('/') if storage.is_url(path) else os.path.abspath(path)


def _canonical(path: str) -> str:
    return path.rstrip('/') if storage.is_url(path) else os.path.realpath(path)


def check_out_dir(out_dir: str, export_format: str, workdir: str, current: dict, slide_ids):
    """Refuses another run's export; says which of `current` (ExportJob.settings) differ."""
    folder = storage.join(out_dir, fmt.H5_DIR)
    paths = ([storage.join(out_dir, fmt.NPZ_NAME)] if export_format == 'npz' else
             [storage.join(folder, name) for name in sorted(storage.listdir(folder))
              if name.endswith('.h5')] if storage.isdir(folder) else [])
    files = {}
    for path in paths:   # unreadable files are left out: the export redoes them
        try:
            files[path] = fmt.file_attrs(path, tuple(current) + ('workdir', 'slide_id'))
        except fmt.UNREADABLE:
            continue
    mine = _canonical(workdir)
    inside = _canonical(out_dir).startswith(mine + '/')
    foreign = {p: a for p, a in files.items()
               if a.get('weights_sha256') != current.get('weights_sha256')
               and not (a.get('workdir') and _canonical(str(a['workdir'])) == mine)}
    if foreign and not inside:
        path, attrs = next(iter(foreign.items()))
        whose = (f"the run {attrs['workdir']}" if attrs.get('workdir') else
                 'an export made before exports recorded their run')
        raise ConfigError(
            f'export.out_dir {out_dir} holds {len(foreign)} files of another export '
            f'({os.path.basename(path)}: {whose}, step {attrs.get("checkpoint_step", "?")}); '
            f'export {workdir} into another folder (--config.export.out_dir=DIR) or delete '
            f'{out_dir} first')
    ours = set(slide_ids)
    files = {p: a for p, a in files.items()
             if export_format == 'npz' or str(a.get('slide_id')) in ours}
    differ = [name for name in current
              if any(not _same(a.get(name), current[name]) for a in files.values())]
    if differ:
        steps = sorted({int(a['checkpoint_step']) for a in files.values()
                        if 'checkpoint_step' in a})
        log.warning('export: %s holds %d files exported with other weights or settings '
                    '(step %s; differing: %s); those are exported again with step %d',
                    out_dir, len(files), ', '.join(map(str, steps)) or '?',
                    ', '.join(differ), current['checkpoint_step'])


def _rows(source, indices, by_path: bool):
    """Each patch as the export's files record it: ([path,] x, y, label); slides by coordinates."""
    return [((r.path,) if by_path else ()) + (-1 if r.x is None else int(r.x),
                                              -1 if r.y is None else int(r.y), r.label or '')
            for r in map(source.record, indices)]


def _stored_rows(arrays, by_path: bool):
    labels = arrays.get('labels', [''] * len(arrays['coords']))
    return [((str(p),) if by_path else ()) + (int(x), int(y), str(label))
            for p, (x, y), label in zip(arrays['paths'], arrays['coords'], labels)]


def _is_subsequence(stored, current) -> bool:
    """Whether the written rows are the source's in order, some (unreadable) left out."""
    if len(stored) == len(current):   # nothing was left out: one comparison
        return stored == current
    it = iter(current)
    return all(any(row == c for c in it) for row in stored)


def _written(out_dir: str, export_format: str, slides):
    """(slide, {coords, paths, labels}, coords attrs) of each readable file of `slides`."""
    if export_format == 'npz':
        try:
            with storage.open_header(storage.join(out_dir, fmt.NPZ_NAME)) as raw, \
                    np.load(raw, allow_pickle=False) as f:
                owner = f['slide_ids']
                arrays = {k: f[k] for k in ('coords', 'paths', 'labels') if k in f.files}
        except fmt.UNREADABLE:   # FileNotFoundError included
            return
        for slide in slides:
            yield slide, {k: v[owner == slide] for k, v in arrays.items()}, {}
        return
    for slide in slides:
        path = storage.join(out_dir, fmt.slide_file('h5', slide))
        try:
            with fmt.open_h5(path) as f:
                arrays = {k: f[k].asstr()[()] for k in ('paths', 'labels') if k in f}
                found = dict(arrays, coords=f['coords'][()]), dict(f['coords'].attrs)
        except fmt.UNREADABLE:
            continue
        yield (slide,) + found


@dataclasses.dataclass
class ExportJob:
    run: run_dir.Run
    data_path: str
    out_dir: str
    source: sources_lib.PatchSource   # of data_path
    options: EmbedOptions
    normalization: run_dir.Normalization
    choice: object = 'latest'      # export.checkpoint: latest | best | a step
    export_settings: dict = dataclasses.field(default_factory=dict)
    plans: dict = dataclasses.field(default_factory=dict)   # export.mpps: scales.SlidePlan

    @functools.cached_property
    def slide_ids(self) -> List[str]:
        return list(group_by_slide(self.source))

    @functools.cached_property
    def weights_sha256(self) -> str:
        return weights_digest(self.run.weights.online_variables)

    @property
    def settings(self) -> dict:
        """What the export's files record that makes them this export's (check_out_dir)."""
        return {'checkpoint_step': self.run.step, 'weights_sha256': self.weights_sha256,
                'image_size': self.options.image_size,
                'with_projection': self.options.with_projection,
                'norm_mean': np.asarray(self.normalization.mean, np.float64),
                'norm_std': np.asarray(self.normalization.std, np.float64),
                'data_path': self.data_path,
                'config_json': json.dumps(json.loads(run_dir.config_text(self.run.config)),
                                          sort_keys=True),
                **option_attrs(self.options)}

    def _drop_stale(self):
        """Deletes the files of slides made from other patches than the source lists now."""
        source, groups = self.source, group_by_slide(self.source)
        by_path = not source.from_slides
        tiling = {} if by_path else {s.slide_id: s.coords.attrs for s in source.slides}
        stale = {}
        for slide, arrays, written in _written(self.out_dir, self.options.export_format, groups):
            changed = [k for k, v in tiling.get(slide, {}).items()
                       if k not in ('tiling_key', 'slide_path')
                       and not _same(written.get(k), v)]
            if changed:
                stale[slide] = f'it was tiled again ({", ".join(sorted(changed))} differ)'
            elif not _is_subsequence(_stored_rows(arrays, by_path),
                                     _rows(source, groups[slide], by_path)):
                stale[slide] = ('its patches (files or coordinates) changed' if by_path else
                                'its patch coordinates changed')
        if not stale:
            return
        log.warning('export: %d slides are exported again because their patches changed '
                    'since they were exported: %s', len(stale),
                    '; '.join(f'{s}: {why}' for s, why in list(stale.items())[:5])
                    + (' ...' if len(stale) > 5 else ''))
        if self.options.export_format == 'npz':
            storage.remove(storage.join(self.out_dir, fmt.NPZ_NAME))
            return
        for slide in stale:
            for path in (storage.join(self.out_dir, fmt.slide_file('h5', slide)),
                         fmt.pt_file(self.out_dir, slide)):
                if storage.exists(path):
                    storage.remove(path)

    def run_export(self) -> List[dict]:
        """Embeds and writes; returns the manifest rows; DataError if nothing was read."""
        log.info('export: step %d of %s, %s -> %s (%d slides, %d patches at %d px; '
                 'normalization: %s)', self.run.step, self.run.workdir, self.data_path,
                 self.out_dir, len(self.slide_ids), len(self.source),
                 self.options.image_size, self.normalization.origin)
        self._drop_stale()
        embedder = Embedder(self.run.network, self.run.weights.online_variables,
                            self.normalization.mean, self.normalization.std, self.run.step)
        best = run_dir.read_best(self.run.workdir)   # which checkpoint and why
        note = (f"best: step {best['step']} by {best['metric']} = {best['value']:.6g} "
                f"({best['mode']})" if best is not None and best['step'] == self.run.step
                and self.choice == 'best' else f'{self.choice}: step {self.run.step}')
        info = {'workdir': _absolute(self.run.workdir), 'data_path': self.data_path,
                'weights_sha256': self.weights_sha256, 'checkpoint': note,
                'normalization': self.normalization.to_json(),
                'config': json.loads(run_dir.config_text(self.run.config)),
                'export': dict(self.export_settings, checkpoint_step=self.run.step)}
        rows = export_embeddings(embedder, self.source, self.out_dir, self.options, info,
                                 self.plans)
        n_patches = sum(r['n_patches'] for r in rows)
        if not n_patches:
            raise DataError(f'no readable patch in {self.data_path}: nothing was exported '
                            f'(unreadable files: {storage.join(self.out_dir, fmt.SKIPPED_NAME)})')
        log.info('export: %d slides, %d patches in %s', len(rows), n_patches, self.out_dir)
        return rows


def prepare_export(workdir: str, exp, normalization: Optional[run_dir.Normalization] = None,
                   hed: float = 0.0, transform=None, transform_name: str = '') -> ExportJob:
    """The run's weights and what to embed (`normalization`: the command line's; `hed`: the
    strength of export.augment_copies, 0: the run's augment.hed; `transform`: uint8 -> uint8
    on every patch read, before the model's input, e.g. stain normalisation, recorded in the
    files as `transform_name`)."""
    choice = parse_checkpoint_choice(exp.checkpoint)
    run = run_dir.load_run(workdir, choice)
    data_path = exp.data_path or run.config.data.path
    if not data_path:
        raise ConfigError('nothing to export: set --config.export.data_path=DIR')
    if not storage.exists(data_path):
        raise DataError(f"the patches to export are gone: {data_path} (the run's data.path);"
                        f' set --config.export.data_path=DIR')
    trained_at = run.config.data.image_size
    if transform is None:   # a run trained on stain-normalised patches embeds them so too
        transform = stain_norm.prepare(run.config, workdir, None, record=False)
        transform_name = stain_norm.digest(transform) if transform else ''
    hed = float(hed or run.config.augment.hed)
    if exp.augment_copies and not hed:
        raise ConfigError(f'export.augment_copies={exp.augment_copies} jitters the stains with '
                          f"augment.hed, which the run did not train with: set its strength "
                          f"(--config.augment.hed=0.05, Tellez et al.'s)")
    options = EmbedOptions(image_size=exp.image_size or trained_at, batch_size=exp.batch_size,
                           export_format=exp.format, with_projection=exp.with_projection,
                           num_workers=exp.num_workers, pt_files=exp.pt_files,
                           mpps=tuple(sorted(float(m) for m in exp.mpps)),
                           augment_copies=int(exp.augment_copies),
                           augment_hed=hed if exp.augment_copies else 0.0,
                           augment_seed=int(run.config.train.seed), transform=transform,
                           transform_name=transform_name,
                           # the run's dtype named explicitly is the same arithmetic: the
                           # same files and export key as export.dtype=model
                           dtype='' if exp.dtype in ('model', run.config.model.dtype)
                           else exp.dtype)
    if exp.pt_files:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ConfigError('export.pt_files needs torch: pip install -r '
                              'requirements-torch.txt (or clusiam_jax[torch])') from None
    if options.image_size != trained_at:
        log.warning('export: embedding at %d px; the run trained at %d px (data.image_size)',
                    options.image_size, trained_at)
    slide_dir = exp.slide_dir or (run.config.data.slide_dir
                                  if data_path == run.config.data.path else '')
    source = sources_lib.open_source(data_path, slide_dir)
    if exp.format == 'npz' and source.from_slides:
        raise ConfigError(f'{data_path} is read from whole slides: export it as per-slide '
                          f"h5 files (export.format=h5), which carry each slide's tiling "
                          f'attributes and slide path')
    # Before any weight is read to the device or anything compiles: one line per refusal.
    plans = scales.plan_slides(source, options.mpps, group_by_slide(source), data_path)
    out_dir = exp.out_dir or storage.join(workdir, DEFAULT_DIR)
    settings = dict(json.loads(json.dumps(exp.to_dict(), default=str)),
                    out_dir=_absolute(out_dir), data_path=data_path, slide_dir=slide_dir,
                    checkpoint=choice if isinstance(choice, int) else str(choice),
                    image_size=options.image_size,
                    compute_dtype=options.dtype or run.config.model.dtype)
    job = ExportJob(run=run, data_path=data_path, choice=choice, out_dir=out_dir,
                    source=source, options=options, export_settings=settings, plans=plans,
                    normalization=resolve_normalization(run, normalization))
    check_out_dir(job.out_dir, options.export_format, workdir, job.settings, job.slide_ids)
    return job


def export(workdir, exp, normalization=None, argv=None, hed=0.0, transform=None,
           transform_name='') -> str:
    """Embeds, then writes the QuPath tiles, cluster maps and atlas asked for; the folder
    (`hed`, `transform`: prepare_export's)."""
    with folder_lock(workdir, exp, argv):
        job = prepare_export(workdir, exp, normalization, hed, transform, transform_name)
        if exp.cluster_maps:
            check_thumbnail(exp.thumbnail, len(job.slide_ids))  # before embedding
        job.run_export()
        try:
            if exp.qupath:
                files = write_export_geojson(job.out_dir)
                log.info('QuPath tiles (File > Import objects): %d files in %s', len(files),
                         os.path.dirname(files[0]) if files else job.out_dir)
            if exp.cluster_maps:
                maps = draw_export_maps(job.out_dir, thumbnail=exp.thumbnail or None,
                                        downsample=exp.thumbnail_downsample or None,
                                        alpha=exp.map_alpha, annotations=exp.annotations or None)
                if maps:
                    log.info('cluster maps: %s', ', '.join(maps))
            if exp.atlas:
                write_atlas(job.out_dir)
        except ClusiamError as e:
            raise type(e)(f'{e}; the embeddings are exported in {job.out_dir} (a rerun '
                          f'skips finished slides)') from None
    return job.out_dir


def folder_lock(workdir, exp, argv=None):
    """The lock of the folder an export writes, created if needed: one export per folder."""
    out_dir = exp.out_dir or storage.join(workdir, DEFAULT_DIR)
    created = not storage.is_url(out_dir) and not os.path.isdir(out_dir)
    writable_folder(out_dir, '--config.export.out_dir')
    return workdir_lock.hold(out_dir, '--config.export.out_dir', argv, created=created)
