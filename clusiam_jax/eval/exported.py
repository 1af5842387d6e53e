"""Reading an export back (h5_files/ or embeddings.npz) and drawing its cluster maps.

The export's layout is documented in `clusiam_jax/export.py`; this module only reads
it, so evaluation works on exports copied to another machine without the run.
"""
import csv
import logging
import os

import numpy as np
from PIL import Image

from clusiam_jax.eval.cluster_map import draw_cluster_map

log = logging.getLogger('clusiam_jax')

MANIFEST_NAME = 'manifest.csv'
NPZ_NAME = 'embeddings.npz'
MAPS_DIR = 'cluster_maps'
_IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.webp')


def read_manifest(out_dir):
    """The export's manifest rows (slide_id, n_patches, label, file)."""
    with open(os.path.join(out_dir, MANIFEST_NAME), newline='') as f:
        return list(csv.DictReader(f))


def _decode(values):
    return np.array([v.decode('utf-8') if isinstance(v, bytes) else str(v) for v in values],
                    dtype=object)


def read_slide(out_dir, row):
    """{name: array} of one manifest row; string datasets come back as str objects."""
    path = os.path.join(out_dir, row['file'])
    if row['file'].endswith('.npz'):
        with np.load(path) as f:
            keep = f['slide_ids'] == row['slide_id']
            return {k: (f[k][keep].astype(object) if f[k].dtype.kind == 'U' else f[k][keep])
                    for k in f.files if f[k].ndim >= 1 and f[k].shape[0] == keep.shape[0]
                    and k != 'slide_ids'} | {'patch_size': int(f['patch_sizes'][keep][0])}
    import h5py
    with h5py.File(path, 'r') as f:
        out = {}
        for name, ds in f.items():
            out[name] = _decode(ds[()]) if ds.dtype.kind in 'OS' else ds[()]
        out['patch_size'] = int(f['coords'].attrs.get('patch_size', 0))
        return out


def read_export(out_dir, slides=None):
    """{slide_id: arrays} for every slide of the manifest (or only `slides`)."""
    data = {}
    for row in read_manifest(out_dir):
        if slides is None or row['slide_id'] in slides:
            data[row['slide_id']] = dict(read_slide(out_dir, row), label=row['label'])
    return data


def find_thumbnail(thumbnail, slide_id, n_slides):
    """The thumbnail file for a slide: `thumbnail` itself when it is a file (only for
    a one-slide export), else `<thumbnail>/<slide_id>[_thumb].<ext>`; None if absent."""
    if not thumbnail:
        return None
    if os.path.isfile(thumbnail):
        if n_slides > 1:
            raise ValueError(f'export.thumbnail {thumbnail} is one file but the export has '
                             f'{n_slides} slides: give a folder of <slide_id>.png thumbnails')
        return thumbnail
    if not os.path.isdir(thumbnail):
        raise FileNotFoundError(f'export.thumbnail not found: {thumbnail}')
    for stem in (slide_id, slide_id + '_thumb'):
        for ext in _IMAGE_EXTENSIONS:
            path = os.path.join(thumbnail, stem + ext)
            if os.path.isfile(path):
                return path
    return None


def draw_export_maps(out_dir, thumbnail=None, downsample=None, num_clusters=None):
    """Draws `<out_dir>/cluster_maps/<slide>.png` for every slide with coordinates and
    cluster ids; returns the written paths. Over the slide's thumbnail when one is found
    (then `downsample`, level-0 pixels per thumbnail pixel, is required), else over a
    white mosaic canvas."""
    rows = read_manifest(out_dir)
    maps_dir = os.path.join(out_dir, MAPS_DIR)
    written = []
    for row in rows:
        arrays = read_slide(out_dir, row)
        if 'cluster_ids' not in arrays:
            log.info('cluster maps: the model has no cluster head; nothing to draw')
            return written
        coords, ids = arrays['coords'], arrays['cluster_ids']
        known = np.all(coords >= 0, axis=1)
        if not known.any():
            log.warning('cluster maps: slide %s has no patch coordinates; skipped',
                        row['slide_id'])
            continue
        thumb_path = find_thumbnail(thumbnail, row['slide_id'], len(rows))
        thumb = None
        if thumb_path is not None:
            if downsample is not None and downsample <= 0:
                raise ValueError(f'the thumbnail downsample must be positive; got {downsample}')
            if not downsample:
                raise ValueError('a thumbnail needs export.thumbnail_downsample (level-0 '
                                 'pixels per thumbnail pixel)')
            try:
                thumb = Image.open(thumb_path).convert('RGB')
            except OSError as e:  # PIL's UnidentifiedImageError is one
                raise ValueError(f'thumbnail {thumb_path} is not a readable image ({e})') from None
        k = num_clusters or (arrays['cluster_logits'].shape[1]
                             if 'cluster_logits' in arrays else None)
        patch_size = arrays.get('patch_size') or 224
        os.makedirs(maps_dir, exist_ok=True)
        stem = os.path.splitext(os.path.basename(row['file']))[0] \
            if row['file'].endswith('.h5') else row['slide_id']
        path = os.path.join(maps_dir, stem + '.png')
        tmp = f'{path}.tmp{os.getpid()}.png'
        draw_cluster_map(coords[known], ids[known], patch_size, thumbnail=thumb,
                         downsample=downsample if thumb is not None else None,
                         num_clusters=k, out_path=tmp)
        os.replace(tmp, path)
        written.append(path)
    return written
