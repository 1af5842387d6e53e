r"""Embedding export: per-patch features and cluster assignments from a run's checkpoint.

  python launch.py --mode export --config configs/<recipe>.py --workdir RUN \
      [--config.export.data_path=DIR] [--config.export.out_dir=DIR] [--config.export.format=npz]

What is embedded (SPEC s7): each whole patch, resized to `data.image_size` with the
training's bilinear resize (a no-op for the usual 224 px patches), normalized with the
*training* mean/std, through the online network in inference mode (BatchNorm running
statistics). `features` is the pooled backbone output (512-d for ResNet-18),
`cluster_logits` the cluster head's logits and `cluster_ids` their argmax (no Gumbel
noise); `projections` (the projector output z) only with `export.with_projection`.

Output (`export.out_dir`, default `RUN/export`):
  h5_files/<slide>.h5   per slide, the CLAM layout: `features` float32 [N, D], `coords`
                        int64 [N, 2] (level-0 top-left x, y; -1 when the file name has
                        none) with attrs patch_level, patch_size, downsample; plus
                        `cluster_ids` int32 [N], `cluster_logits` float32 [N, K],
                        `paths` (utf-8), `labels` (utf-8, when the source has them),
                        `projections`; file attrs record checkpoint step, model,
                        normalization and the run's config.
  embeddings.npz        instead of h5_files/ with format=npz: the same arrays over all
                        patches, plus `slide_ids`.
  manifest.csv          slide_id, n_patches, label, file
  export_info.json      run, checkpoint step, normalization, config, counts
  skipped_files.txt     unreadable images (skipped, as in training)
  cluster_maps/<slide>.png   with export.cluster_maps

Every file is written to a temporary name and renamed, so a crash leaves no half-written
output; a rerun skips slides whose file was written from the same checkpoint with the
same patch count.
"""
import concurrent.futures
import contextlib
import collections
import csv
import datetime
import json
import logging
import os
import re

import jax
import numpy as np
from tqdm import tqdm

from clusiam_jax import parallel
from clusiam_jax.data import augment, image_io, skips
from clusiam_jax.data import sources as sources_lib
from clusiam_jax.data import stats as stats_lib
from clusiam_jax.models.conv import compiler_options
from clusiam_jax.run_dir import load_run
from clusiam_jax.train.step import normalize_images

log = logging.getLogger('clusiam_jax')

EXPORT_VERSION = 1
H5_DIR = 'h5_files'
NPZ_NAME = 'embeddings.npz'
MANIFEST_NAME = 'manifest.csv'
INFO_NAME = 'export_info.json'
MAPS_DIR = 'cluster_maps'
UNKNOWN_SLIDE = 'unknown_slide'


def training_normalization(config, workdir=None, fallback=None):
    """(mean, std, origin): the normalization the run trained with.

    The config's data.mean/std when set; else the stats of the training list of
    data.path, from the cache training wrote (computed and cached again if missing).
    `fallback` (a config) supplies data.mean/std when the training data is gone.
    """
    data = config.data
    if data.mean is not None and data.std is not None:
        return tuple(data.mean), tuple(data.std), 'config data.mean/std'
    if data.path and os.path.exists(data.path):
        _, source = sources_lib.open_source(data.path)
        mean, std = stats_lib.cached_stats(data.path, source, workdir=workdir)
        return tuple(mean), tuple(std), f'stats of the training list of {data.path}'
    if fallback is not None and fallback.data.mean is not None:
        log.warning('training data %r is gone; using the given data.mean/std', data.path)
        return tuple(fallback.data.mean), tuple(fallback.data.std), 'given data.mean/std'
    raise FileNotFoundError(
        f'cannot recover the training normalization: the run has no data.mean/std and its '
        f'data.path {data.path!r} is gone; pass --config.data.mean=... --config.data.std=...')


# ----------------------------------------------------------------- the forward pass

def make_embed_fn(network, mean, std, mesh, with_projection=False):
    """jit(variables, uint8 [B, H, W, 3]) -> dict of per-patch outputs, batch sharded.

    B must be a multiple of the mesh size (the caller pads the last batch).
    """
    def embed(variables, images):
        x = normalize_images(images, mean, std, network.dtype)
        out = network.apply(variables, x, train=False)
        result = {'features': out['features'].astype(np.float32)}
        if 'logits' in out:
            result['cluster_logits'] = out['logits'].astype(np.float32)
        if with_projection:
            result['projections'] = out['z']
        return result

    return jax.jit(embed, in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                   out_shardings=parallel.batch_sharded(mesh),
                   compiler_options=compiler_options(network.conv_impl))


def _load_patch(source, index, size):
    """(uint8 [size, size, 3], original (h, w)) or (None, reason) for an unreadable file."""
    try:
        img = source.load(index)
    except image_io.BadImageError as e:
        return None, str(e)
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
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# --------------------------------------------------------------------- writing

def slide_file_name(slide_id: str) -> str:
    """A file-system safe stem for a slide id."""
    return re.sub(r'[^\w.\-]+', '_', slide_id) or '_'


@contextlib.contextmanager
def _atomic_write(path):
    """Yields a temporary path next to `path`, renamed onto it only if the body finishes:
    a crash never leaves a half-written file under the final name."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_h5(path, arrays, attrs, coords_attrs):
    import h5py  # only the export needs it
    with _atomic_write(path) as tmp, h5py.File(tmp, 'w') as f:
        for name, value in arrays.items():
            if value.dtype.kind in 'OU':
                f.create_dataset(name, data=np.asarray(value, dtype=object),
                                 dtype=h5py.string_dtype('utf-8'))
            else:
                f.create_dataset(name, data=value)
        f.attrs.update(attrs)
        f['coords'].attrs.update(coords_attrs)


def _write_npz(path, arrays):
    with _atomic_write(path) as tmp, open(tmp, 'wb') as f:
        np.savez(f, **arrays)


def _write_text(path, text):
    with _atomic_write(path) as tmp, open(tmp, 'w', newline='') as f:
        f.write(text)


def _remove_stale_temporaries(folder):
    """Temporary files of an interrupted export (never read: they are not *.h5)."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if re.search(r'\.tmp\d+$', name):
            os.remove(os.path.join(folder, name))


def _finished_h5(path, checkpoint_step, n_patches):
    """Whether `path` holds this slide from this checkpoint (then the rerun skips it)."""
    import h5py
    try:
        with h5py.File(path, 'r') as f:
            return (int(f.attrs.get('checkpoint_step', -1)) == checkpoint_step
                    and int(f.attrs.get('n_records', -1)) == n_patches)
    except (OSError, KeyError):
        return False


def _slide_label(labels):
    """A slide's label: the one label its patches share, else ''."""
    distinct = {l for l in labels if l}
    return distinct.pop() if len(distinct) == 1 else ''


class _SlideBuffer:
    """Rows of one slide gathered in order until all of its patches are through."""

    def __init__(self, slide_id, records):
        self.slide_id, self.records = slide_id, records
        self.rows, self.seen, self.patch_size = [], 0, None

    def add(self, record, outputs, shape):
        self.seen += 1
        if outputs is None:
            return
        if self.patch_size is None:
            self.patch_size = int(shape[1])
        self.rows.append((record, outputs))

    @property
    def done(self):
        return self.seen == len(self.records)

    def arrays(self):
        recs = [r for r, _ in self.rows]
        out = {'coords': np.array([[-1 if r.x is None else r.x, -1 if r.y is None else r.y]
                                   for r in recs], np.int64).reshape(-1, 2),
               'paths': np.array([r.path for r in recs], dtype=object)}
        if self.rows:
            for name in self.rows[0][1]:
                out[name] = np.stack([o[name] for _, o in self.rows])
        if 'cluster_logits' in out:
            out['cluster_ids'] = np.argmax(out['cluster_logits'], axis=1).astype(np.int32)
        if any(r.label for r in recs):
            out['labels'] = np.array([r.label or '' for r in recs], dtype=object)
        return out


def _group_by_slide(records):
    """{slide_id: [records]} in order of first appearance (records keep their order)."""
    groups = collections.OrderedDict()
    for r in records:
        groups.setdefault(r.slide_id or UNKNOWN_SLIDE, []).append(r)
    return groups


def export_embeddings(network, state, data_path, out_dir, mean, std, *, batch_size=256,
                      image_size=224, export_format='h5', with_projection=False,
                      num_workers=4, checkpoint_step=None, info=None, mesh=None,
                      opened=None):
    """Embeds every patch of `data_path` and writes the export to `out_dir`.

    opened: `sources_lib.open_source(data_path)` when the caller has it already (a
    listing of millions of patches is not read twice).
    Returns the manifest rows (dicts: slide_id, n_patches, label, file).
    """
    if export_format not in ('h5', 'npz'):
        raise ValueError(f"export.format must be 'h5' or 'npz'; got {export_format!r}")
    mesh = mesh if mesh is not None else parallel.make_mesh(jax.local_devices())
    step = int(jax.device_get(state.step)) if checkpoint_step is None else int(checkpoint_step)
    records, source = opened or sources_lib.open_source(data_path)
    index_of = {id(r): i for i, r in enumerate(records)}
    groups = _group_by_slide(records)
    os.makedirs(out_dir, exist_ok=True)
    h5_dir = os.path.join(out_dir, H5_DIR)
    if export_format == 'h5':
        os.makedirs(h5_dir, exist_ok=True)
        _remove_stale_temporaries(h5_dir)
    _remove_stale_temporaries(out_dir)
    skip_log = skips.SkipLog(os.path.join(out_dir, skips.SKIPPED_FILES))

    file_of = {s: (os.path.join(H5_DIR, slide_file_name(s) + '.h5')
                   if export_format == 'h5' else NPZ_NAME) for s in groups}
    if export_format == 'h5':
        todo = [s for s in groups if not _finished_h5(os.path.join(out_dir, file_of[s]),
                                                      step, len(groups[s]))]
    else:
        todo = [] if _finished_npz(os.path.join(out_dir, NPZ_NAME), step, len(records)) \
            else list(groups)
    if len(todo) < len(groups):
        log.info('export: %d of %d slides already exported from step %d; skipping them',
                 len(groups) - len(todo), len(groups), step)

    common_attrs = {
        'checkpoint_step': step, 'method': network.method, 'backbone': network.backbone,
        'image_size': image_size, 'norm_mean': np.asarray(mean, np.float64),
        'norm_std': np.asarray(std, np.float64), 'export_version': EXPORT_VERSION,
        'features': 'pooled backbone output, inference-mode BatchNorm',
    }
    if info is not None:
        common_attrs['config_json'] = json.dumps(info.get('config', {}), sort_keys=True)

    stream = [(s, r) for s in todo for r in groups[s]]
    npz_parts = []
    if stream:
        ndev = mesh.devices.size
        # One compiled shape: a fixed batch, a multiple of the devices, no larger than
        # the work (a 40-patch demo must not pad to 256).
        batch = min(-(-batch_size // ndev) * ndev, -(-len(stream) // ndev) * ndev)
        embed = make_embed_fn(network, mean, std, mesh, with_projection)
        variables = {'params': state.params, 'batch_stats': state.batch_stats}
        buffers = {s: _SlideBuffer(s, groups[s]) for s in todo}
        bar = tqdm(total=len(stream), unit='patch', desc='export', dynamic_ncols=True)
        pool = concurrent.futures.ThreadPoolExecutor(max(1, num_workers))
        loads = (lambda r=r: _load_patch(source, index_of[id(r)], image_size)
                 for _, r in stream)
        results = _prefetched(loads, pool, window=2 * batch)

        def flush(chunk):
            images = np.zeros((batch, image_size, image_size, 3), np.uint8)
            valid = [i for i, (_, _, img, _) in enumerate(chunk) if img is not None]
            for i in valid:
                images[i] = chunk[i][2]
            outputs = jax.device_get(embed(variables, images)) if valid else {}
            for i, (slide, record, img, shape) in enumerate(chunk):
                if img is None:
                    skip_log.record(record.path, shape)
                    buffers[slide].add(record, None, None)
                else:
                    buffers[slide].add(record, {k: v[i] for k, v in outputs.items()}, shape)
                if buffers[slide].done:
                    finish(buffers.pop(slide))
            bar.update(len(chunk))

        def finish(buf):
            arrays = buf.arrays()
            if not buf.rows:
                log.warning('export: slide %s has no readable patch; no file written',
                            buf.slide_id)
                return
            if export_format == 'npz':
                arrays['patch_sizes'] = np.full(len(buf.rows), buf.patch_size, np.int32)
                npz_parts.append((buf.slide_id, arrays))
                return
            attrs = dict(common_attrs, slide_id=buf.slide_id, n_records=len(buf.records),
                         n_patches=len(buf.rows))
            coords_attrs = {'patch_level': 0, 'patch_size': buf.patch_size,
                            'downsample': np.array([1.0, 1.0]), 'name': buf.slide_id}
            _write_h5(os.path.join(out_dir, file_of[buf.slide_id]), arrays, attrs,
                      coords_attrs)

        try:
            chunk = []
            for (slide, record), (img, shape) in zip(stream, results):
                chunk.append((slide, record, img, shape))
                if len(chunk) == batch:
                    flush(chunk)
                    chunk = []
            if chunk:
                flush(chunk)
        finally:
            bar.close()
            pool.shutdown(wait=True, cancel_futures=True)
        if export_format == 'npz':
            _write_npz(os.path.join(out_dir, NPZ_NAME),
                       _concat_npz(npz_parts, common_attrs, len(records)))

    rows = _manifest_rows(out_dir, groups, file_of)
    _write_manifest(os.path.join(out_dir, MANIFEST_NAME), rows)
    if info is not None:
        info = dict(info, checkpoint_step=step, format=export_format, data_path=data_path,
                    normalization={'mean': list(mean), 'std': list(std),
                                   **({'origin': info['normalization_origin']}
                                      if 'normalization_origin' in info else {})},
                    image_size=image_size, with_projection=with_projection,
                    n_slides=len(rows), n_patches=int(sum(r['n_patches'] for r in rows)),
                    n_skipped=len(skip_log.paths()),
                    finished=datetime.datetime.now().isoformat(timespec='seconds'))
        info.pop('normalization_origin', None)
        _write_text(os.path.join(out_dir, INFO_NAME), json.dumps(info, indent=2, default=str))
    return rows


def _finished_npz(path, checkpoint_step, n_records):
    if not os.path.exists(path):
        return False
    try:
        with np.load(path, allow_pickle=False) as f:
            return (int(f['checkpoint_step']) == checkpoint_step
                    and int(f['n_records']) == n_records)
    except (OSError, KeyError, ValueError):
        return False


def _concat_npz(parts, common_attrs, n_records):
    """One set of arrays over all slides; strings as unicode (no pickle needed to load)."""
    out = {}
    names = sorted({k for _, arrays in parts for k in arrays})
    for name in names:
        values = [arrays[name] for _, arrays in parts if name in arrays]
        joined = np.concatenate(values) if values else np.zeros((0,))
        out[name] = joined.astype(str) if joined.dtype == object else joined
    out['slide_ids'] = np.concatenate(
        [np.full(len(arrays['coords']), slide) for slide, arrays in parts]).astype(str) \
        if parts else np.zeros((0,), str)
    out['checkpoint_step'] = np.int64(common_attrs['checkpoint_step'])
    out['n_records'] = np.int64(n_records)
    out['norm_mean'] = common_attrs['norm_mean']
    out['norm_std'] = common_attrs['norm_std']
    return out


def _manifest_rows(out_dir, groups, file_of):
    """One row per slide with a written output, counts read back from the files."""
    rows = []
    npz_counts = None
    for slide, recs in groups.items():
        rel = file_of[slide]
        path = os.path.join(out_dir, rel)
        if not os.path.exists(path):
            continue
        if rel == NPZ_NAME:
            if npz_counts is None:
                with np.load(path) as f:
                    ids, counts = np.unique(f['slide_ids'], return_counts=True)
                npz_counts = dict(zip(ids.tolist(), counts.tolist()))
            n = npz_counts.get(slide, 0)
            if not n:
                continue
        else:
            import h5py
            with h5py.File(path, 'r') as f:
                n = int(f['features'].shape[0])
        rows.append({'slide_id': slide, 'n_patches': n,
                     'label': _slide_label([r.label for r in recs]), 'file': rel})
    return rows


def _write_manifest(path, rows):
    import io
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=['slide_id', 'n_patches', 'label', 'file'])
    writer.writeheader()
    writer.writerows(rows)
    _write_text(path, buf.getvalue())


# --------------------------------------------------------------------- the entry

def check_export_config(exp):
    """One-line ConfigErrors for export settings, before anything is restored or computed."""
    from clusiam_jax.config import ConfigError
    if exp.format not in ('h5', 'npz'):
        raise ConfigError(f"export.format must be 'h5' or 'npz'; got {exp.format!r}")
    if exp.batch_size < 1:
        raise ConfigError(f'export.batch_size must be positive; got {exp.batch_size}')
    if exp.out_dir and os.path.isfile(exp.out_dir):
        raise ConfigError(f'export.out_dir {exp.out_dir} is a file, not a folder')
    if exp.cluster_maps and exp.thumbnail:
        if not os.path.exists(exp.thumbnail):
            raise ConfigError(f'export.thumbnail does not exist: {exp.thumbnail}')
        if not exp.thumbnail_downsample or exp.thumbnail_downsample <= 0:
            raise ConfigError('export.thumbnail needs export.thumbnail_downsample (level-0 '
                              'pixels per thumbnail pixel, e.g. 8)')


def export_run(config, workdir: str):
    """`launch.py --mode export`: the latest checkpoint of `workdir` over export.data_path.

    The model, image size and normalization come from the run's own config.json; the
    `export` section (and nothing else) from `config`.
    """
    check_export_config(config.export)
    run_config, network, state = load_run(workdir, config=config)
    for section in ('model',):
        if run_config[section].to_dict() != config[section].to_dict():
            log.warning('the given config\'s %s section differs from the run\'s; the '
                        'run\'s (config.json) is used', section)
    exp = config.export
    mean, std, origin = training_normalization(run_config, workdir, fallback=config)
    data_path = exp.data_path or run_config.data.path
    if not data_path:
        raise FileNotFoundError('nothing to export: set --config.export.data_path=DIR')
    out_dir = exp.out_dir or os.path.join(workdir, 'export')
    opened = sources_lib.open_source(data_path)
    if exp.cluster_maps and exp.thumbnail and os.path.isfile(exp.thumbnail):
        # Found out before embedding, not after: one thumbnail file fits one slide.
        from clusiam_jax.config import ConfigError
        from clusiam_jax.eval.exported import find_thumbnail
        n_slides = len(_group_by_slide(opened[0]))
        try:
            find_thumbnail(exp.thumbnail, None, n_slides)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    step = int(jax.device_get(state.step))
    log.info('export: step %d of %s, %s -> %s (normalization: %s)', step, workdir,
             data_path, out_dir, origin)
    info = {'workdir': os.path.abspath(workdir), 'normalization_origin': origin,
            'config': json.loads(run_config.to_json_best_effort())}
    rows = export_embeddings(
        network, state, data_path, out_dir, mean, std, batch_size=exp.batch_size,
        image_size=run_config.data.image_size, export_format=exp.format,
        with_projection=exp.with_projection, num_workers=exp.num_workers,
        checkpoint_step=step, info=info, opened=opened)
    n_patches = sum(r['n_patches'] for r in rows)
    if not n_patches:
        from clusiam_jax.data.records import DataError
        raise DataError(f'no readable patch in {data_path}: nothing was exported '
                        f'(unreadable files: {os.path.join(out_dir, "skipped_files.txt")})')
    log.info('export: %d slides, %d patches in %s', len(rows), n_patches, out_dir)
    if exp.cluster_maps:
        from clusiam_jax.config import ConfigError
        from clusiam_jax.eval.exported import draw_export_maps
        try:
            maps = draw_export_maps(out_dir, thumbnail=exp.thumbnail or None,
                                    downsample=exp.thumbnail_downsample or None)
        except ValueError as e:  # the thumbnail settings do not fit this export
            raise ConfigError(f'{e}; the embeddings are exported in {out_dir} (a rerun '
                              f'skips finished slides)') from None
        if maps:
            log.info('cluster maps: %s', ', '.join(maps))
    return out_dir
