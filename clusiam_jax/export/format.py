"""The export's on-disk layout (docs/formats.md; h5 files: CLAM's plus cluster ids, logits, paths
and labels), its only owner: an export copied elsewhere is read without the run."""
import collections
import contextlib
import hashlib
import io
import json
import logging
import os
from typing import Dict, Iterable, List, Optional

import numpy as np

from clusiam_jax import fileio, storage
from clusiam_jax.errors import DataError
from clusiam_jax.fileio import atomic_write
from clusiam_jax.slides import coords as coords_lib

FORMAT_VERSION = 1
H5_DIR = 'h5_files'
PT_DIR = 'pt_files'
NPZ_NAME = 'embeddings.npz'
MANIFEST_NAME = 'manifest.csv'
INFO_NAME = 'export_info.json'
SKIPPED_NAME = 'skipped_files.txt'
MAPS_DIR = 'cluster_maps'
QUPATH_DIR = 'qupath'
MANIFEST_FIELDS = ('slide_id', 'n_patches', 'label', 'file')
# File attributes of the options that change features (export/embed.option_attrs), present
# only when set; an npz export keeps them among its scalars.
OPTION_ATTRS = ('export_mpps', 'augment_copies', 'augment_hed', 'augment_seed',
                'input_transform')
# The bags of a multi-scale export (docs/formats.md): each patch's feature followed by its
# coarser parents'; augmented copies [N, K, D] of the features (export.augment_copies).
CAT = 'cat'
AUGMENTED = '_augmented'   # features_augmented, cat_augmented, features_scale1_augmented
# What reading a file of an export can raise when it is damaged or gone (a bucket's: DataError).
UNREADABLE = (OSError, KeyError, ValueError, DataError)

log = logging.getLogger('clusiam_jax')


def slide_file(export_format: str, slide_id: str) -> str:
    """The file (relative to the export) that holds a slide's arrays."""
    if export_format == 'npz':
        return NPZ_NAME
    return coords_lib.slide_path(H5_DIR, slide_id, '.h5')


def pt_file(out_dir: str, slide_id: str) -> str:
    """Where a slide's CLAM-style torch features go (export.pt_files)."""
    return coords_lib.slide_path(storage.join(out_dir, PT_DIR), slide_id, '.pt')


def map_file(out_dir: str, row: dict) -> str:
    """A slide's cluster map: named like its h5 file (older exports' cleaned-up ids)."""
    if row['file'].endswith('.h5'):
        return storage.join(out_dir, MAPS_DIR,
                            os.path.splitext(os.path.basename(row['file']))[0] + '.png')
    return coords_lib.slide_path(storage.join(out_dir, MAPS_DIR), row['slide_id'], '.png')


def make_parent(path: str):
    """The folder a file goes in (a bucket has none to make: names are prefixes)."""
    if not storage.is_url(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)


@contextlib.contextmanager
def open_h5(path: str):
    """An h5 file to read attributes and small arrays from; in a bucket through small ranged
    reads (the header and the arrays asked for travel, never the features)."""
    import h5py  # only exports need it
    if not storage.is_url(path):
        with h5py.File(path, 'r') as f:
            yield f
        return
    with storage.open_header(path) as raw, h5py.File(raw, 'r') as f:
        yield f


def _whole(path: str):
    """A file read whole: from a bucket in one request into memory (reading every array
    through small blocks would cost a request a block)."""
    return io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else path


def prepare_out_dir(out_dir: str, export_format: str):
    """Creates the folders; deletes temporaries and the previous manifest and info."""
    if storage.is_url(out_dir):   # objects are uploaded whole: no temporaries to delete
        storage.makedirs(out_dir)
        for name in (MANIFEST_NAME, INFO_NAME):
            storage.remove(storage.join(out_dir, name))
        return
    folders = [out_dir] + ([os.path.join(out_dir, H5_DIR)] if export_format == 'h5' else [])
    try:
        for folder in folders:
            os.makedirs(folder, exist_ok=True)
            fileio.remove_temporaries(folder)
        for name in (MANIFEST_NAME, INFO_NAME):
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    except OSError as e:
        raise DataError(f'export.out_dir {out_dir}: cannot write there ({e.strerror})') from None


def write_slide_h5(path: str, arrays: Dict[str, np.ndarray], attrs: dict, coords_attrs: dict,
                   dataset_attrs: Optional[Dict[str, dict]] = None):
    """`dataset_attrs`: {dataset: attributes} besides `coords`' (multi-scale: each one's mpp)."""
    import h5py  # only exports need it
    with atomic_write(path) as tmp, h5py.File(tmp, 'w') as f:
        for name, value in arrays.items():
            text = value.dtype.kind in 'OU'
            f.create_dataset(name, data=np.asarray(value, dtype=object) if text else value,
                             dtype=h5py.string_dtype('utf-8') if text else None)
        f.attrs.update(attrs)
        f['coords'].attrs.update(coords_attrs)
        for name, extra in (dataset_attrs or {}).items():
            f[name].attrs.update(extra)


def write_slide_pt(out_dir: str, slide_id: str, features: np.ndarray):
    """The features as a torch tensor, what CLAM's MIL training loads."""
    import torch
    path = pt_file(out_dir, slide_id)
    make_parent(path)
    with atomic_write(path) as tmp, open(tmp, 'wb') as f:
        torch.save(torch.from_numpy(np.ascontiguousarray(features, np.float32)), f)


def write_npz(path: str, parts, attrs: dict):
    """The arrays of all `parts` [(slide_id, arrays)], strings as unicode (no pickle)."""
    out = {}
    for name in sorted({k for _, arrays in parts for k in arrays}):
        # Only `labels` can be missing for some slides: '' keeps the arrays aligned.
        values = [arrays[name] if name in arrays else
                  np.full(len(arrays['coords']), '', dtype=object) for _, arrays in parts]
        joined = np.concatenate(values) if values else np.zeros((0,))
        out[name] = joined.astype(str) if joined.dtype == object else joined
    out['slide_ids'] = (np.concatenate([np.full(len(arrays['coords']), slide)
                                        for slide, arrays in parts]).astype(str)
                        if parts else np.zeros((0,), str))
    out.update({name: np.asarray(value) for name, value in attrs.items()})
    with atomic_write(path) as tmp, open(tmp, 'wb') as f:
        np.savez(f, **out)


def write_manifest(out_dir: str, rows: Iterable[dict]):
    fileio.write_csv(storage.join(out_dir, MANIFEST_NAME), MANIFEST_FIELDS, rows)


def write_info(out_dir: str, info: dict):
    fileio.write_json(storage.join(out_dir, INFO_NAME), info, default=str)


def export_key(attrs: dict) -> str:
    """A digest of what makes two exports of a slide the same: a rerun skips a slide by it."""
    fields = {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v)
              for k, v in sorted(attrs.items())}
    return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def file_attrs(path: str, keys) -> dict:
    """Those of `keys` a slide file records; one of UNREADABLE if unreadable."""
    if path.endswith('.npz'):
        with storage.open_header(path) as raw, np.load(raw, allow_pickle=False) as f:
            return {k: (f[k].item() if f[k].ndim == 0 else f[k]) for k in keys if k in f.files}
    with open_h5(path) as f:
        return {k: f.attrs[k] for k in keys if k in f.attrs}


def is_finished(out_dir: str, export_format: str, slide_id: str, key: str, n_records: int) -> bool:
    """Whether a rerun skips the slide (npz: all): same export key and record count."""
    try:
        attrs = file_attrs(storage.join(out_dir, slide_file(export_format, slide_id)),
                           ('export_key', 'n_records'))
    except UNREADABLE:
        return False
    return (str(attrs.get('export_key', '')) == key
            and int(attrs.get('n_records', -1)) == n_records)


def written_counts(out_dir: str, export_format: str, slide_ids) -> Dict[str, int]:
    """{slide_id: patches written}, from the files: the manifest describes what is on disk."""
    if export_format == 'npz':
        path = storage.join(out_dir, NPZ_NAME)
        if not storage.exists(path):
            return {}
        with storage.open_header(path) as raw, np.load(raw) as f:
            stored = collections.Counter(f['slide_ids'].tolist())
        return {s: stored[s] for s in slide_ids if stored[s]}
    counts = {}
    for slide in slide_ids:
        path = storage.join(out_dir, slide_file('h5', slide))
        if storage.exists(path):
            with open_h5(path) as f:
                counts[slide] = int(f['features'].shape[0])
    return counts


def read_export_manifest(out_dir: str) -> List[dict]:
    """The export's manifest rows (slide_id, n_patches, label, file)."""
    path = storage.join(out_dir, MANIFEST_NAME)
    if not storage.isfile(path):
        raise DataError(f'{out_dir} is not an export: it has no {MANIFEST_NAME} (export '
                        f'first: python launch.py --mode export --workdir RUN)')
    return fileio.read_csv_rows(path, 'export manifest')[1]


def read_export_info(out_dir: str) -> dict:
    """The export's export_info.json; {} when missing or unreadable (with a warning)."""
    path = storage.join(out_dir, INFO_NAME)
    try:
        if not storage.exists(path):
            return {}
        info = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, DataError) as e:
        log.warning('%s is unreadable (%s); titles omit the run and step', path, e)
        return {}
    return info if isinstance(info, dict) else {}


def read_slide(out_dir: str, row: dict) -> Dict[str, np.ndarray]:
    """{name: array} of an h5 manifest row, plus `patch_size` and the slide's path and size."""
    import h5py
    with h5py.File(_whole(storage.join(out_dir, row['file'])), 'r') as f:
        out = {name: (ds.asstr()[()] if ds.dtype.kind in 'OS' else ds[()])
               for name, ds in f.items()}
        coords = f['coords'].attrs
        # TRIDENT's `patch_size` is at the target resolution; CLAM's is level 0.
        out['patch_size'] = int(coords.get('patch_size_level0', coords.get('patch_size', 0)))
        if 'slide_path' in f.attrs:
            out['slide_path'] = str(f.attrs['slide_path'])
        if 'level0_width' in coords:
            out['level0_dimensions'] = (int(coords['level0_width']), int(coords['level0_height']))
        return out


def _npz_slides(path: str, slide_ids) -> Dict[str, dict]:
    """{slide_id: arrays} of an embeddings.npz, each array read once."""
    with np.load(_whole(path)) as f:
        arrays = {k: f[k] for k in f.files}
    owner = arrays.pop('slide_ids')
    per_patch = {k: v for k, v in arrays.items()
                 if v.ndim >= 1 and v.shape[0] == owner.shape[0] and k != 'patch_sizes'}
    out = {}
    for slide in slide_ids:
        keep = owner == slide
        out[slide] = {k: (v[keep].astype(object) if v.dtype.kind == 'U' else v[keep])
                      for k, v in per_patch.items()}
        out[slide]['patch_size'] = int(arrays['patch_sizes'][keep][0])
    return out


def iter_slides(out_dir: str, rows):
    """(row, arrays) per manifest row, one h5 slide in memory at a time (an npz read once)."""
    npz = [row['slide_id'] for row in rows if row['file'].endswith('.npz')]
    loaded = _npz_slides(storage.join(out_dir, NPZ_NAME), npz) if npz else {}
    for row in rows:
        yield row, loaded.pop(row['slide_id'], None) or read_slide(out_dir, row)


def read_export(out_dir: str, slides=None) -> Dict[str, dict]:
    """{slide_id: arrays + its manifest `label`} for every slide (or only `slides`)."""
    rows = [row for row in read_export_manifest(out_dir)
            if slides is None or row['slide_id'] in slides]
    return {row['slide_id']: dict(arrays, label=row['label'])
            for row, arrays in iter_slides(out_dir, rows)}


def clustered_slides(out_dir: str, what: str):
    """(row, arrays, bool [N] of patches with coordinates, K); nothing without a cluster head."""
    for row, arrays in iter_slides(out_dir, read_export_manifest(out_dir)):
        if 'cluster_ids' not in arrays:
            log.info('%s: the model has no cluster head; nothing to draw', what)
            return
        known = np.all(arrays['coords'] >= 0, axis=1)
        if not known.any():
            log.warning('%s: slide %s has no patch coordinates; skipped', what, row['slide_id'])
            continue
        k = (arrays['cluster_logits'].shape[1] if 'cluster_logits' in arrays
             else int(arrays['cluster_ids'][known].max()) + 1)
        yield row, arrays, known, k


def slide_feature_files(features: str) -> Dict[str, str]:
    """{slide_id: path of its HDF5 file} of an export of ours or a CLAM-style folder."""
    if storage.isfile(storage.join(features, MANIFEST_NAME)):
        rows = read_export_manifest(features)
        if any(not row['file'].endswith('.h5') for row in rows):
            raise DataError(f'{features} is an npz export; slide-level evaluation reads '
                            f'per-slide HDF5 files (export again with --config.export.format=h5)')
        return {row['slide_id']: storage.join(features, row['file']) for row in rows}
    if not storage.isdir(features):
        raise DataError(f'features folder not found: {features}')
    return {os.path.splitext(name)[0]: storage.join(features, name)
            for name in sorted(storage.listdir(features)) if name.endswith('.h5')}


def read_h5_array(path: str, key: str = 'features') -> np.ndarray:
    """One array of a per-slide HDF5 file (ours or CLAM's), as float32."""
    import h5py
    with h5py.File(_whole(path), 'r') as f:
        if key not in f:
            raise DataError(f'{path} has no {key!r} array (it has {", ".join(f.keys())})')
        return np.asarray(f[key], np.float32)
