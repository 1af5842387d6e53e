"""Per-slide coordinate files: TRIDENT's (which `--mode tile` writes) and CLAM's.

TRIDENT, `patches/<slide_id>_patches.h5`: dataset `coords` int64 [N, 2], level-0 top-left
(x, y), with attributes `patch_size` (pixels at the target resolution),
`patch_size_level0`, `level0_magnification`, `target_magnification`, `overlap`,
`level0_width`, `level0_height`, `name`; we add `target_mpp`, `level0_mpp` and
`tiling_key` (what a rerun compares).

CLAM, `patches/<slide_id>.h5`: `coords` with `patch_level` and `patch_size` in pixels
*at that level* (plus `downsample`, `level_dim`, `name`, optional `custom_downsample`).
The two `patch_size`s differ in meaning; `read_coords` turns both into a `SlideCoords`
that says how many level-0 pixels a patch covers and at what size it is embedded.
"""
import dataclasses
import os
import re
from typing import Optional

import numpy as np

from clusiam_jax.atomic import atomic_write
from clusiam_jax.errors import DataError

PATCHES_DIR = 'patches'
TRIDENT_SUFFIX = '_patches.h5'


@dataclasses.dataclass(frozen=True)
class SlideCoords:
    """What a coordinate file says about one slide's patches."""
    slide_id: str
    coords: np.ndarray             # int64 [N, 2], level-0 top-left (x, y)
    patch_size_level0: float       # level-0 pixels a patch covers
    patch_size: Optional[int]      # pixels a patch is read at; None: from the slide
    attrs: dict                    # the file's coords attributes, copied to exports
    patch_level: Optional[int] = None  # CLAM: the level its patch_size refers to


def trident_file(out_dir: str, slide_id: str) -> str:
    return os.path.join(out_dir, PATCHES_DIR, slide_id + TRIDENT_SUFFIX)


def write_trident(path: str, coords: np.ndarray, attrs: dict):
    """Writes a TRIDENT coordinate file atomically."""
    import h5py
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path) as tmp, h5py.File(tmp, 'w') as f:
        ds = f.create_dataset('coords', data=np.asarray(coords, np.int64).reshape(-1, 2))
        ds.attrs.update(attrs)


def slide_id_of_file(name: str) -> str:
    """`<id>_patches.h5` (TRIDENT) or `<id>.h5` (CLAM) -> id."""
    base = os.path.basename(name)
    if base.endswith(TRIDENT_SUFFIX):
        return base[:-len(TRIDENT_SUFFIX)]
    return re.sub(r'\.h5$', '', base)


def _attr(attrs, key, default=None):
    value = attrs.get(key, default)
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def read_coords(path: str) -> SlideCoords:
    """A coordinate file of either schema; DataError (one line) when it is neither."""
    import h5py
    try:
        with h5py.File(path, 'r') as f:
            if 'coords' not in f:
                raise DataError(f'{path}: no "coords" dataset (not a CLAM/TRIDENT patch file)')
            ds = f['coords']
            coords = np.asarray(ds[()], np.int64).reshape(-1, 2)
            attrs = {k: _attr(ds.attrs, k) for k in ds.attrs.keys()}
    except OSError as e:
        raise DataError(f'{path}: not a readable HDF5 file ({e})') from None
    slide_id = slide_id_of_file(path)
    if 'patch_size_level0' in attrs:  # TRIDENT
        return SlideCoords(slide_id, coords, float(attrs['patch_size_level0']),
                           int(attrs['patch_size']), attrs)
    if 'patch_level' in attrs and 'patch_size' in attrs:  # CLAM
        size = int(attrs['patch_size'])
        level = int(attrs['patch_level'])
        custom = int(attrs.get('custom_downsample', 1) or 1)
        downsample = attrs.get('downsample')
        level0 = float(size * np.asarray(downsample, float).ravel()[0]) \
            if downsample is not None else None
        return SlideCoords(slide_id, coords, level0 if level0 else float(size),
                           max(1, size // custom), attrs,
                           patch_level=None if level0 else level)
    raise DataError(f'{path}: the coords attributes have neither TRIDENT\'s '
                    f'patch_size_level0 nor CLAM\'s patch_level + patch_size '
                    f'(found: {", ".join(sorted(attrs)) or "none"})')


def list_coord_files(folder: str):
    """{slide_id: path} of the *.h5 coordinate files of a `patches/` folder, sorted."""
    names = sorted(n for n in os.listdir(folder) if n.endswith('.h5') and not n.startswith('.'))
    out = {}
    for name in names:
        slide_id = slide_id_of_file(name)
        if slide_id in out:
            raise DataError(f'{folder}: two coordinate files for slide {slide_id!r}')
        out[slide_id] = os.path.join(folder, name)
    return out
