"""The embedding loop (docs/method.md §7): patches decoded by a thread pool ahead of one jitted
pass over the mesh; each slide's file is written when its last patch is through."""
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import itertools
import json
import logging
import os
import tempfile
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

from clusiam_jax import interrupts, parallel, storage
from clusiam_jax.data import augment, image_io, skips
from clusiam_jax.export import format as fmt
from clusiam_jax.models.conv import compiler_options
from clusiam_jax.models.preprocess import embed_images
from clusiam_jax.slides import coords as coords_lib

log = logging.getLogger('clusiam_jax')

UNKNOWN_SLIDE = 'unknown_slide'


@dataclasses.dataclass(frozen=True)
class EmbedOptions:
    """How to embed: the `export` section, resolved against the run."""
    image_size: int                # patches are resized to this (the run's training size)
    batch_size: int
    export_format: str             # h5 | npz (export/format.py)
    with_projection: bool
    num_workers: int               # image-decoding threads
    pt_files: bool = False         # also pt_files/<slide>.pt (h5 only)


@dataclasses.dataclass(frozen=True)
class Embedder:
    """A network with its inference weights and normalization, on a mesh."""
    network: object
    variables: dict                # {'params', 'batch_stats'} of the online network
    mean: Sequence[float]
    std: Sequence[float]
    checkpoint_step: int
    mesh: object = None

    def embed_fn(self, with_projection: bool):
        """jit(variables, uint8 [B, H, W, 3]), B a multiple of the mesh size."""
        network, mean, std = self.network, self.mean, self.std

        def embed(variables, images):
            result = embed_images(network, variables, images, mean, std, with_projection)
            if 'logits' in result:
                result['cluster_logits'] = result.pop('logits')
            return result

        return jax.jit(embed, in_shardings=(parallel.replicated(self.mesh),
                                            parallel.batch_sharded(self.mesh)),
                       out_shardings=parallel.batch_sharded(self.mesh),
                       compiler_options=compiler_options(network.conv_impl))


def group_by_slide(source) -> Dict[str, np.ndarray]:
    """{slide_id: int64 indices of its patches}, slides in order of first appearance."""
    names = np.where(source.slide_ids == '', UNKNOWN_SLIDE, source.slide_ids.astype(object))
    names, merged = np.unique(names.astype(str), return_inverse=True)   # '' and a literal id agree
    codes = merged.reshape(-1)[source.slide_index]
    present, first, counts = np.unique(codes, return_index=True, return_counts=True)
    members = np.split(np.argsort(codes, kind='stable'), np.cumsum(counts)[:-1])
    return collections.OrderedDict((str(names[present[k]]), members[k].astype(np.int64))
                                   for k in np.argsort(first))


def _load_patch(source, index, size):
    """(uint8 [size, size, 3], original (h, w)) or (None, the BadImageError)."""
    try:
        img = source.load(index)
    except image_io.BadImageError as e:
        return None, e
    h, w = img.shape[:2]
    if (h, w) != (size, size):
        img = augment.resized_crop(img, (0, 0, h, w), size)
    return img, (h, w)


def _prefetched(loads, executor, window):
    """Results of `loads` (callables) in order, with at most `window` in flight."""
    pending = collections.deque()
    for fn in loads:
        pending.append(executor.submit(fn))
        if len(pending) >= window:
            interrupts.check()  # a safe point per patch: a signal stops the export here
            yield pending.popleft().result()
    while pending:
        interrupts.check()
        yield pending.popleft().result()


class _SlideWriter:
    """Writes each slide's file when its last record is through (npz: all at the end)."""

    def __init__(self, groups, out_dir, options: EmbedOptions, attrs: dict, skip_log, source=None):
        self.groups, self.out_dir, self.options = groups, out_dir, options
        self.attrs, self.skip_log = attrs, skip_log
        self.slide_attrs = source.coords_attrs if source.from_slides else None
        self.rows = {s: [] for s in groups}
        self.seen = collections.Counter()
        self.patch_size, self.npz_parts, self.resize_noted = {}, [], False

    def add(self, slide, record, outputs: Optional[dict], shape_or_reason):
        self.seen[slide] += 1
        if outputs is None:  # a slide that cannot be opened is listed once, not per patch
            self.skip_log.record(getattr(shape_or_reason, 'subject', None) or record.path,
                                 str(shape_or_reason).split(': ', 1)[-1])
        else:   # said once: right (training saw whole tiles), but not obvious
            size, shape = self.options.image_size, shape_or_reason
            if not self.resize_noted and tuple(shape) != (size, size):
                self.resize_noted = True
                log.info('export: patches of %dx%d px are resized to %d px (the image size the '
                         'run trained at; --config.export.image_size embeds at another)',
                         shape[1], shape[0], size)
            self.patch_size.setdefault(slide, int(shape_or_reason[1]))
            self.rows[slide].append((record, outputs))
        if self.seen[slide] == len(self.groups[slide]):
            self._finish(slide)

    def _arrays(self, rows):
        recs = [r for r, _ in rows]
        out = {'coords': np.array([[-1 if r.x is None else r.x, -1 if r.y is None else r.y]
                                   for r in recs], np.int64).reshape(-1, 2),
               'paths': np.array([r.path for r in recs], dtype=object),
               **{name: np.stack([o[name] for _, o in rows]) for name in rows[0][1]}}
        if 'cluster_logits' in out:
            out['cluster_ids'] = np.argmax(out['cluster_logits'], axis=1).astype(np.int32)
        if any(r.label for r in recs):
            out['labels'] = np.array([r.label or '' for r in recs], dtype=object)
        return out

    def _finish(self, slide):
        rows = self.rows.pop(slide)
        if not rows:
            log.warning('export: slide %s has no readable patch; no file written', slide)
            return
        arrays = self._arrays(rows)
        if self.options.export_format == 'npz':
            arrays['patch_sizes'] = np.full(len(rows), self.patch_size[slide], np.int32)
            self.npz_parts.append((slide, arrays))
            return
        attrs = dict(self.attrs, slide_id=slide, n_records=len(self.groups[slide]),
                     n_patches=len(rows))
        if self.slide_attrs is not None:  # the tiling's attributes, TRIDENT's schema
            coords_attrs = self.slide_attrs(slide)
            attrs['slide_path'] = coords_attrs.pop('slide_path')
            coords_attrs.pop('tiling_key', None)
        else:
            coords_attrs = {'patch_level': 0, 'patch_size': self.patch_size[slide],
                            'downsample': np.array([1.0, 1.0]), 'name': slide}
        fmt.write_slide_h5(storage.join(self.out_dir, fmt.slide_file('h5', slide)), arrays,
                           attrs, coords_attrs)
        pt = fmt.pt_file(self.out_dir, slide)
        if self.options.pt_files or storage.exists(pt):
            try:   # a pt file never holds other features than its h5 file
                fmt.write_slide_pt(self.out_dir, slide, arrays['features'])
            except ImportError:
                if self.options.pt_files:
                    raise
                storage.remove(pt)
                log.warning('export: removed %s, made with other features (torch is not '
                            'installed to rewrite it; export.pt_files=True needs it)', pt)

    def close(self, n_records: int):
        if self.options.export_format == 'npz':
            keep = ('export_key', 'workdir', 'weights_sha256', 'norm_mean', 'norm_std')
            fmt.write_npz(storage.join(self.out_dir, fmt.NPZ_NAME), self.npz_parts,
                          dict({k: self.attrs[k] for k in keep}, n_records=np.int64(n_records),
                               checkpoint_step=np.int64(self.attrs['checkpoint_step'])))


@contextlib.contextmanager
def _skip_log(out_dir: str):
    """The export's list of unreadable files; in a bucket a local copy (SkipLog appends under a
    flock), uploaded whole at the end, interrupted or not."""
    path = storage.join(out_dir, fmt.SKIPPED_NAME)
    if not storage.is_url(out_dir):
        yield skips.SkipLog(path)
        return
    with tempfile.TemporaryDirectory(prefix='clusiam-') as folder:
        local = os.path.join(folder, fmt.SKIPPED_NAME)
        before = storage.read_bytes(path) if storage.exists(path) else None
        if before is not None:
            with open(local, 'wb') as f:
                f.write(before)
        try:
            yield skips.SkipLog(local)
        finally:
            if os.path.exists(local) and storage.read_bytes(local) != before:
                storage.upload(local, path)


def export_embeddings(embedder: Embedder, source, out_dir: str, options: EmbedOptions,
                      info: dict) -> List[dict]:
    """Embeds every patch of `source` into `out_dir` (a rerun skips finished slides)."""
    with _skip_log(out_dir) as skip_log:
        return _export(embedder, source, out_dir, options, info, skip_log)


def _export(embedder, source, out_dir, options, info, skip_log):
    mesh = embedder.mesh if embedder.mesh is not None else parallel.make_mesh(jax.local_devices())
    embedder = dataclasses.replace(embedder, mesh=mesh)
    step, fmt_name = embedder.checkpoint_step, options.export_format
    groups = group_by_slide(source)
    for slide in groups:   # every slide's files are named by its id: refuse, before any
        coords_lib.check_slide_id(slide)   # work, an id that would name a file elsewhere
    fmt.prepare_out_dir(out_dir, fmt_name)

    attrs = {'checkpoint_step': step, 'method': embedder.network.method,
             'backbone': embedder.network.backbone, 'image_size': options.image_size,
             'norm_mean': np.asarray(embedder.mean, np.float64),
             'norm_std': np.asarray(embedder.std, np.float64),
             'with_projection': options.with_projection, 'export_version': fmt.FORMAT_VERSION,
             'features': 'pooled backbone output, inference-mode BatchNorm',
             'config_json': json.dumps(info['config'], sort_keys=True),
             'data_path': info['data_path'],
             # the run and its exact weights: another checkpoint is never "already done"
             'workdir': info.get('workdir', ''), 'weights_sha256': info.get('weights_sha256', '')}
    attrs['export_key'] = key = fmt.export_key(attrs)
    if fmt_name == 'npz':
        todo = [] if fmt.is_finished(out_dir, 'npz', '', key, len(source)) else list(groups)
    else:
        todo = [s for s in groups if not fmt.is_finished(out_dir, 'h5', s, key, len(groups[s]))]
    if len(todo) < len(groups):
        log.info('export: %d of %d slides already exported with these settings from step '
                 '%d; skipping them', len(groups) - len(todo), len(groups), step)
    # pt files change no feature: those of finished slides are made from their h5 file.
    finished = set(groups).difference(todo) if options.pt_files else set()
    missing = [s for s in groups if s in finished and not storage.exists(fmt.pt_file(out_dir, s))]
    for slide in missing:
        interrupts.check()
        fmt.write_slide_pt(out_dir, slide, fmt.read_h5_array(
            storage.join(out_dir, fmt.slide_file('h5', slide))))
    if missing:
        log.info('export: pt files of %d finished slides written from their h5 features',
                 len(missing))
    writer = _SlideWriter({s: groups[s] for s in todo}, out_dir, options, attrs, skip_log, source)
    if sum(len(groups[s]) for s in todo):
        _embed_stream(embedder, source, writer, options)
        writer.close(len(source))

    counts = fmt.written_counts(out_dir, fmt_name, list(groups))
    labels = {s: {label for label in source.labels(groups[s]) if label} for s in counts}
    rows = [{'slide_id': s, 'n_patches': counts[s],
             'label': labels[s].pop() if len(labels[s]) == 1 else '',
             'file': fmt.slide_file(fmt_name, s)} for s in groups if s in counts]
    fmt.write_manifest(out_dir, rows)
    # The run's config without its `export` section: `export` holds this export's own.
    fmt.write_info(out_dir, dict(
        info, config={k: v for k, v in info['config'].items() if k != 'export'},
        checkpoint_step=step, format=fmt_name, image_size=options.image_size,
        with_projection=options.with_projection, n_slides=len(rows),
        n_patches=int(sum(r['n_patches'] for r in rows)), n_skipped=len(skip_log.paths()),
        finished=datetime.datetime.now().isoformat(timespec='seconds')))
    return rows


def _embed_stream(embedder, source, writer, options):
    """Fixed-size batches of the writer's slides' decoded patches through the network."""
    ndev, total = embedder.mesh.devices.size, sum(map(len, writer.groups.values()))
    # One compiled shape: a multiple of the devices, no larger than the work.
    batch = min(-(-options.batch_size // ndev) * ndev, -(-total // ndev) * ndev)
    embed = embedder.embed_fn(options.with_projection)
    size = options.image_size
    loads = (lambda i=int(i): _load_patch(source, i, size)
             for indices in writer.groups.values() for i in indices)
    bar = tqdm(total=total, unit='patch', desc='export', dynamic_ncols=True)
    pool = concurrent.futures.ThreadPoolExecutor(max(1, options.num_workers))
    items = zip(((slide, int(i)) for slide, indices in writer.groups.items() for i in indices),
                _prefetched(loads, pool, window=2 * batch))
    try:
        while chunk := list(itertools.islice(items, batch)):   # padded to `batch`
            images = np.zeros((batch, size, size, 3), np.uint8)
            valid = [i for i, (_, (img, _)) in enumerate(chunk) if img is not None]
            for i in valid:
                images[i] = chunk[i][1][0]
            outputs = jax.device_get(embed(embedder.variables, images)) if valid else {}
            for i, ((slide, index), (img, shape)) in enumerate(chunk):
                writer.add(slide, source.record(index), None if img is None else
                           {k: v[i] for k, v in outputs.items()}, shape)
            bar.update(len(chunk))
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)
