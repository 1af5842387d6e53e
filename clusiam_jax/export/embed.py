"""The embedding loop (docs/method.md §7): patches decoded by a thread pool ahead of one jitted
pass over the mesh; each slide's file is written when its last patch is through."""
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import itertools
import json
import logging
import os
import tempfile
import zlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from clusiam_jax import interrupts, parallel, storage
from clusiam_jax.data import augment, image_io, skips
from clusiam_jax.export import format as fmt
from clusiam_jax.export import scales
from clusiam_jax.models.conv import compiler_options, resolve_conv_impl
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
    mpps: Tuple[float, ...] = ()   # export.mpps, finest first (export/scales.py)
    augment_copies: int = 0        # K HED-jittered embeddings of every patch too
    augment_hed: float = 0.0       # their strength (augment.hed)
    augment_seed: int = 0          # their draws: from (seed, slide, scale, patch, copy)
    # uint8 -> uint8 on every patch read, before resizing and the model's normalization
    # (stain normalisation); its name goes into the files and the export key.
    transform: Optional[Callable] = None
    transform_name: str = ''
    # export.dtype where it is not the run's model.dtype ('': the run's own): the network
    # computes in it from the same float32 parameters; its name goes into the export key.
    dtype: str = ''

    @property
    def copies(self) -> int:
        """Images embedded per patch: the plain one and the augmented copies."""
        return 1 + self.augment_copies


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


def _load_patch(source, index, size, transform=None):
    """(uint8 [size, size, 3], original (h, w)) or (None, the BadImageError)."""
    try:
        img = source.load(index)
    except image_io.BadImageError as e:
        return None, e
    return _input(img, size, transform)


def _input(img, size, transform):
    """(the patch as the model takes it: transformed, resized to `size`; its (h, w))."""
    h, w = img.shape[:2]
    if transform is not None:
        img = transform(img)
    if (h, w) != (size, size):
        img = augment.resized_crop(img, (0, 0, h, w), size)
    return img, (h, w)


def copy_rng(seed: int, slide: str, scale: int, position: int, copy: int):
    """The generator of one augmented copy: the same for any batch size, worker count or
    rerun (the slide by a CRC of its id, the patch by its place in the slide's list)."""
    return np.random.default_rng([int(seed), zlib.crc32(slide.encode('utf-8')), int(scale),
                                  int(position), int(copy)])


def _copies(img, options, slide, scale, position):
    """[img] and its export.augment_copies HED-jittered copies."""
    if not options.augment_copies:
        return [img]
    from clusiam_jax.data import stain
    return [img] + [stain.hed_jitter(img, copy_rng(options.augment_seed, slide, scale, position,
                                                   k), options.augment_hed)
                    for k in range(options.augment_copies)]


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
    """Writes each slide's file when its last patch (of every scale) is through (npz: all at
    the end)."""

    def __init__(self, groups, out_dir, options: EmbedOptions, attrs: dict, skip_log, source,
                 plans=None):
        self.groups, self.out_dir, self.options = groups, out_dir, options
        self.attrs, self.skip_log, self.source = attrs, skip_log, source
        self.slide_attrs = source.coords_attrs if source.from_slides else None
        self.plans = {s: p for s, p in (plans or {}).items() if s in groups}
        self.rows = {s: [] for s in groups}
        self.positions = {s: [] for s in groups}     # each row's place in the slide's list
        self.coarse = {s: [{} for _ in p.scales[1:]] for s, p in self.plans.items()}
        self.expected = {s: len(g) + (sum(len(c.coords) for c in self.plans[s].scales[1:])
                                      if s in self.plans else 0) for s, g in groups.items()}
        self.seen = collections.Counter()
        self.patch_size, self.npz_parts, self.resize_noted = {}, [], False

    def units(self):
        """(slide, scale, position) of every patch to embed, in writing order: a slide's
        grid patches, then its coarser scales' (export.mpps)."""
        for slide, indices in self.groups.items():
            yield from ((slide, 0, p) for p in range(len(indices)))
            plan = self.plans.get(slide)
            for s, scale in enumerate(plan.scales[1:] if plan else (), start=1):
                yield from ((slide, s, j) for j in range(len(scale.coords)))

    def read(self, slide, scale, position):
        """The unit's images (the plain one, then its copies) or None, and its original
        (h, w) or the BadImageError."""
        options, plan = self.options, self.plans.get(slide)
        size, transform = options.image_size, options.transform
        if plan is None or (scale == 0 and plan.native):
            img, shape = _load_patch(self.source, int(self.groups[slide][position]), size,
                                     transform)
        else:
            try:
                # Centred squares at another µm/px (white past the slide's edges).
                img, shape = _input(self.source.read(plan.slide_index,
                                                     *plan.square(scale, position),
                                                     plan.out_size), size, transform)
            except image_io.BadImageError as e:
                img, shape = None, e
        return (None if img is None else _copies(img, options, slide, scale, position)), shape

    def add(self, slide, scale, position, outputs: Optional[List[dict]], shape_or_reason):
        """A unit's outputs (one dict per image: the plain one first), None if unreadable."""
        self.seen[slide] += 1
        record = self.source.record(int(self.groups[slide][position])) if scale == 0 else None
        if outputs is None:  # a slide that cannot be opened is listed once, not per patch
            where = getattr(shape_or_reason, 'subject', None) or (
                record.path if record is not None else str(shape_or_reason).split(': ')[0])
            self.skip_log.record(where, str(shape_or_reason).split(': ', 1)[-1])
        elif scale:
            self.coarse[slide][scale - 1][position] = self._with_copies(outputs, {})
        else:   # said once: right (training saw whole tiles), but not obvious
            size, shape = self.options.image_size, shape_or_reason
            if not self.resize_noted and tuple(shape) != (size, size):
                self.resize_noted = True
                log.info('export: patches of %dx%d px are resized to %d px (the image size the '
                         'run trained at; --config.export.image_size embeds at another)',
                         shape[1], shape[0], size)
            self.patch_size.setdefault(slide, int(shape_or_reason[1]))
            self.rows[slide].append((record, self._with_copies(outputs, outputs[0])))
            self.positions[slide].append(position)
        if self.seen[slide] == self.expected[slide]:
            self._finish(slide)

    @staticmethod
    def _with_copies(outputs, kept):
        """`kept` plus `features_augmented` [K, D] from the copies' outputs."""
        out = dict(kept) if kept else {'features': outputs[0]['features']}
        if len(outputs) > 1:
            out['features_augmented'] = np.stack([o['features'] for o in outputs[1:]])
        return out

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
        rows, positions = self.rows.pop(slide), np.array(self.positions.pop(slide), np.int64)
        plan, coarse = self.plans.get(slide), self.coarse.pop(slide, None)
        if plan is not None and rows:   # a patch whose coarser square is unreadable goes too
            keep = scales.readable(plan, positions, coarse)
            if not keep.all():
                log.warning('export: slide %s: %d patches left out, a coarser patch holding '
                            'them being unreadable', slide, int((~keep).sum()))
            rows, positions = [r for r, k in zip(rows, keep) if k], positions[keep]
        if not rows:
            log.warning('export: slide %s has no readable patch; no file written', slide)
            return
        arrays, dataset_attrs = self._arrays(rows), {}
        if plan is not None:
            extra, dataset_attrs = scales.assemble(plan, positions, coarse, arrays['features'],
                                                   arrays.get('features_augmented'))
            arrays.update(extra)
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
                           attrs, coords_attrs, dataset_attrs)
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
            keep = ('export_key', 'workdir', 'weights_sha256', 'norm_mean', 'norm_std',
                    'compute_dtype') + tuple(
                k for k in fmt.OPTION_ATTRS if k in self.attrs)
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
                      info: dict, plans=None) -> List[dict]:
    """Embeds every patch of `source` into `out_dir` (a rerun skips finished slides);
    `plans`: {slide: scales.SlidePlan} of export.mpps."""
    with _skip_log(out_dir) as skip_log:
        return _export(embedder, source, out_dir, options, info, skip_log, plans or {})


def option_attrs(options: EmbedOptions) -> dict:
    """The file attributes of the options that change features, only those set: an export
    without them keeps the attributes (and export key) it always had."""
    attrs = {}
    if options.mpps:
        attrs['export_mpps'] = np.asarray(options.mpps, np.float64)
    if options.augment_copies:
        attrs.update(augment_copies=int(options.augment_copies),
                     augment_hed=float(options.augment_hed),
                     augment_seed=int(options.augment_seed))
    if options.transform is not None:
        attrs['input_transform'] = options.transform_name or repr(options.transform)
    if options.dtype:
        attrs['compute_dtype'] = options.dtype
    return attrs


def _export(embedder, source, out_dir, options, info, skip_log, plans):
    mesh = embedder.mesh if embedder.mesh is not None else parallel.make_mesh(jax.local_devices())
    network = embedder.network
    if options.dtype:   # the model's own dtype path: layers cast the float32 parameters
        network = network.clone(dtype=jnp.dtype(options.dtype))
    embedder = dataclasses.replace(embedder, mesh=mesh, network=network)
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
             'workdir': info.get('workdir', ''), 'weights_sha256': info.get('weights_sha256', ''),
             **option_attrs(options)}
    if resolve_conv_impl(network.conv_impl, network.dtype) == 'onednn':
        # oneDNN rounds to bf16 between layers where XLA:CPU kept float32: other features,
        # so another key than an export the same run made on XLA's kernels
        attrs['conv_kernels'] = 'onednn'
    attrs['export_key'] = key = fmt.export_key(attrs)
    # Recorded always; in the key only as export.dtype (the run's own is in config_json).
    attrs.setdefault('compute_dtype', jnp.dtype(network.dtype).name)
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
    writer = _SlideWriter({s: groups[s] for s in todo}, out_dir, options, attrs, skip_log, source,
                          plans)
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


def _unit(writer, unit):
    return (unit,) + writer.read(*unit)


def _embed_stream(embedder, source, writer, options):
    """Fixed-size batches of the writer's decoded patches (each with its augmented copies)
    through the network; a patch goes to the writer when its last image is through."""
    ndev, copies = embedder.mesh.devices.size, options.copies
    n_units = sum(writer.expected.values())
    # One compiled shape: a multiple of the devices, no larger than the work.
    batch = min(-(-options.batch_size // ndev) * ndev, -(-n_units * copies // ndev) * ndev)
    embed = embedder.embed_fn(options.with_projection)
    size = options.image_size
    loads = (functools.partial(_unit, writer, unit) for unit in writer.units())
    bar = tqdm(total=n_units, unit='patch', desc='export', dynamic_ncols=True)
    pool = concurrent.futures.ThreadPoolExecutor(max(1, options.num_workers))
    # One item per image: (unit number, unit, images of the unit, image or None, shape/error).
    items = ((n, unit, len(images or [None]), img, shape)
             for n, (unit, images, shape) in enumerate(_prefetched(loads, pool, 2 * batch))
             for img in (images or [None]))
    done = {}
    try:
        while chunk := list(itertools.islice(items, batch)):   # padded to `batch`
            images = np.zeros((batch, size, size, 3), np.uint8)
            valid = [i for i, item in enumerate(chunk) if item[3] is not None]
            for i in valid:
                images[i] = chunk[i][3]
            outputs = jax.device_get(embed(embedder.variables, images)) if valid else {}
            for i, (n, unit, count, img, shape) in enumerate(chunk):
                done.setdefault(n, []).append(
                    None if img is None else {k: v[i] for k, v in outputs.items()})
                if len(done[n]) == count:
                    results = done.pop(n)
                    writer.add(*unit, None if results[0] is None else results, shape)
                    bar.update(1)
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)
