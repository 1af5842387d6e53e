"""Per-slide coordinate files (docs/formats.md): TRIDENT's `patches/<id>_patches.h5`, which
`--mode tile` writes, and CLAM's `patches/<id>.h5`; `read_coords` checks either, so a
damaged or foreign file is refused in one line. Our tilings also keep the tissue mask the
patches were kept by (`read_tissue`), which `data.sampling=tissue_random` draws from. A
slide id names its files verbatim: `slide_path` is the one way to them, refusing ids that
are no file name (`id_problem`).
"""
import dataclasses
import io
import math
import os
from typing import Optional, Tuple

import numpy as np

from clusiam_jax import storage
from clusiam_jax.errors import DataError
from clusiam_jax.fileio import atomic_write

PATCHES_DIR = 'patches'
TRIDENT_SUFFIX = '_patches.h5'
TISSUE_MASK = 'tissue_mask'   # dataset beside `coords`; others' readers ignore it
# Bytes of UTF-8 a slide id may have: file systems take 255 per name, and the longest
# suffix and temporary ending (`_patches.h5.tmp<pid>`) must fit beside it.
MAX_ID_BYTES = 200


@dataclasses.dataclass(frozen=True)
class SlideCoords:
    """What a coordinate file says about one slide's patches."""
    slide_id: str
    coords: np.ndarray             # int64 [N, 2], level-0 top-left (x, y)
    patch_size_level0: float       # level-0 pixels a patch covers
    patch_size: Optional[int]      # pixels a patch is read at; None: from the slide
    attrs: dict                    # the file's coords attributes, copied to exports
    patch_level: Optional[int] = None  # CLAM: the level its patch_size refers to
    has_tissue_mask: bool = False  # a tiling that stored its tissue mask (read_tissue)


@dataclasses.dataclass(frozen=True)
class TissueMask:
    """The mask a tiling kept its patches by, and the rule it kept them with."""
    mask: np.ndarray                 # bool [H, W], the detection image's pixels
    downsample: float                # level-0 px per mask px
    min_tissue: Optional[float]      # the tiling's tile.min_tissue; None: not recorded
    level0_size: Optional[Tuple[int, int]]   # the slide's (width, height); None: unknown


def id_problem(slide_id: str) -> Optional[str]:
    """Why `slide_id` cannot name a file of its own (after "slide id '...'"), or None."""
    if not slide_id:
        return 'is empty'
    if '/' in slide_id or '\\' in slide_id:
        return 'holds a path separator (/ or \\)'
    if slide_id.startswith('.'):
        # `.` and `..` are folders; other dot names are hidden, and skipped by the folder
        # searches that read these files back.
        return "starts with '.'"
    if any(ord(c) < 32 or ord(c) == 127 for c in slide_id):
        return 'holds a control character (NUL, newline, tab, ...)'
    try:
        size = len(slide_id.encode('utf-8'))
    except UnicodeEncodeError:   # a file name that was not UTF-8 (surrogate escapes)
        return 'is not valid UTF-8'
    if size > MAX_ID_BYTES:
        return f'is {size} bytes long (at most {MAX_ID_BYTES})'
    return None


def check_slide_id(slide_id: str) -> str:
    problem = id_problem(slide_id)
    if problem is not None:
        raise DataError(f'slide id {slide_id!r} {problem}: a slide id names its files, so it '
                        f'must be a plain file name (give the slide another id: the '
                        f'slide_id column of the CSV, or the file or folder name)')
    return slide_id


def slide_path(folder: str, slide_id: str, suffix: str) -> str:
    """`folder/<slide_id><suffix>`: a file inside `folder` whatever the id, or DataError."""
    path = storage.join(folder, check_slide_id(slide_id) + suffix)
    if os.path.dirname(os.path.normpath(path)) != os.path.normpath(folder):
        raise DataError(f'slide id {slide_id!r} leads outside {folder}')
    return path


def trident_file(out_dir: str, slide_id: str) -> str:
    return slide_path(storage.join(out_dir, PATCHES_DIR), slide_id, TRIDENT_SUFFIX)


def write_trident(path: str, coords: np.ndarray, attrs: dict,
                  tissue: Optional[TissueMask] = None):
    """The whole file anew (a rerun never keeps an older mask beside newer coordinates)."""
    import h5py
    if not storage.is_url(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path) as tmp, h5py.File(tmp, 'w') as f:
        ds = f.create_dataset('coords', data=np.asarray(coords, np.int64).reshape(-1, 2))
        ds.attrs.update(attrs)
        if tissue is not None:   # 0/1 bytes compress to a few bits a pixel
            mask = f.create_dataset(TISSUE_MASK, data=np.asarray(tissue.mask, np.uint8),
                                    compression='gzip', shuffle=True)
            mask.attrs['tissue_downsample'] = float(tissue.downsample)
            if tissue.min_tissue is not None:
                mask.attrs['min_tissue'] = float(tissue.min_tissue)


def slide_id_of_file(name: str) -> str:
    """`<id>_patches.h5` (TRIDENT) or `<id>.h5` (CLAM) -> id."""
    base = os.path.basename(name)
    return base.removesuffix(TRIDENT_SUFFIX if base.endswith(TRIDENT_SUFFIX) else '.h5')


def _plain(attrs) -> dict:
    return {k: v.decode() if isinstance(v, bytes) else v.item()
            if isinstance(v, np.generic) else v for k, v in attrs.items()}


def read_coords(path: str) -> SlideCoords:
    """A coordinate file of either schema; DataError (one line) when it is neither."""
    import h5py
    # A file in a bucket is read in one GET; h5py reads the bytes from memory.
    source = io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else path
    try:
        with h5py.File(source, 'r') as f:
            if 'coords' not in f:
                raise DataError(f'{path}: no "coords" dataset (not a CLAM/TRIDENT patch file)')
            ds = f['coords']
            raw = np.asarray(ds[()])
            attrs = _plain(ds.attrs)
            has_mask = TISSUE_MASK in f
    except OSError as e:
        raise DataError(f'{path}: not a readable HDF5 file ({e})') from None
    coords = _checked_coords(path, raw, attrs)
    slide_id = slide_id_of_file(path)
    if 'patch_size_level0' in attrs:  # TRIDENT
        return SlideCoords(slide_id, coords, float(attrs['patch_size_level0']),
                           int(attrs['patch_size']), attrs, has_tissue_mask=has_mask)
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
    raise DataError(f"{path}: the coords attributes have neither TRIDENT's "
                    f"patch_size_level0 nor CLAM's patch_level + patch_size "
                    f'(found: {", ".join(sorted(attrs)) or "none"})')


def read_tissue(path: str) -> Optional[TissueMask]:
    """The tissue mask a tiling stored in its coordinate file; None for a file without one
    (a CLAM or TRIDENT file, or one of our tilings made before masks were stored). DataError
    (one line) when the file or its mask is unreadable."""
    import h5py
    source = io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else path
    try:
        with h5py.File(source, 'r') as f:
            if TISSUE_MASK not in f:
                return None
            ds = f[TISSUE_MASK]
            raw = np.asarray(ds[()]) if isinstance(ds, h5py.Dataset) else None
            attrs = _plain(ds.attrs)
            coord_attrs = _plain(f['coords'].attrs) if 'coords' in f else {}
    except OSError as e:
        raise DataError(f'{path}: not a readable HDF5 file ({e})') from None
    if raw is None or raw.ndim != 2 or not raw.size or raw.dtype.kind not in 'biu' or \
            raw.max() > 1:
        raise DataError(f'{path}: {TISSUE_MASK} is not a 2-D array of 0/1 '
                        f'({getattr(raw, "shape", "a group")}): a damaged file; tile again')
    downsample = attrs.get('tissue_downsample')
    if not isinstance(downsample, (int, float)) or not math.isfinite(downsample) or \
            downsample <= 0:
        raise DataError(f'{path}: {TISSUE_MASK} has no positive tissue_downsample attribute '
                        f'(found {downsample!r}): a damaged file; tile again')
    min_tissue = attrs.get('min_tissue')
    width, height = coord_attrs.get('level0_width'), coord_attrs.get('level0_height')
    size = (int(width), int(height)) if isinstance(width, (int, float)) and \
        isinstance(height, (int, float)) else None
    return TissueMask(raw.astype(bool), float(downsample),
                      float(min_tissue) if isinstance(min_tissue, (int, float)) else None, size)


def read_tissue_mask(path: str) -> Optional[Tuple[np.ndarray, float]]:
    """(bool [H, W] tissue mask, level-0 px per mask px) of a coordinate file, or None
    (read_tissue)."""
    found = read_tissue(path)
    return None if found is None else (found.mask, found.downsample)


def _checked_coords(path: str, raw: np.ndarray, attrs: dict) -> np.ndarray:
    """int64 [N, 2] of a file's `coords`, or DataError saying what is wrong with them;
    each patch must start inside the slide (CLAM pads patches past the edge)."""
    if raw.size == 0:
        return np.zeros((0, 2), np.int64)
    if raw.ndim != 2 or raw.shape[1] != 2:
        raise DataError(f'{path}: coords has shape {list(raw.shape)}, not [N, 2] (level-0 '
                        f'x, y): not a patch coordinate file, or a damaged one')
    if raw.dtype.kind == 'f':
        bad = ~np.isfinite(raw).all(axis=1)
        if bad.any():
            raise DataError(f'{path}: coords holds non-finite values (NaN or infinity) in '
                            f'{int(bad.sum())} of {len(raw)} rows, first row {int(bad.argmax())}')
        bad = (raw != np.round(raw)).any(axis=1)
        if bad.any():
            raise DataError(f'{path}: coords are not whole pixel numbers in '
                            f'{int(bad.sum())} of {len(raw)} rows, e.g. '
                            f'{tuple(raw[bad.argmax()].tolist())}')
        if np.abs(raw).max() >= 2 ** 62:
            raise DataError(f'{path}: coords hold values too large for pixel coordinates '
                            f'({np.abs(raw).max():g})')
    elif raw.dtype.kind not in 'iu':
        raise DataError(f'{path}: coords are of type {raw.dtype}, not integers (level-0 '
                        f'pixels)')
    coords = raw.astype(np.int64)
    width, height = attrs.get('level0_width'), attrs.get('level0_height')
    outside = (coords < 0).any(axis=1)
    where = ''
    if isinstance(width, (int, float)) and isinstance(height, (int, float)):
        outside |= (coords[:, 0] >= width) | (coords[:, 1] >= height)
        where = f' ({width:g} x {height:g} px at level 0, as level0_width/height say)'
    if outside.any():
        raise DataError(f'{path}: {int(outside.sum())} of {len(coords)} patches start outside '
                        f'the slide{where}, e.g. {tuple(coords[outside.argmax()].tolist())}')
    step = attrs.get('step_level0')
    if isinstance(step, (int, float)) and step > 0:
        off = ((coords - coords[0]) % int(step) != 0).any(axis=1)
        if off.any():
            raise DataError(f'{path}: {int(off.sum())} of {len(coords)} patches are off the '
                            f'grid of step_level0 {int(step)} from the first one, e.g. '
                            f'{tuple(coords[off.argmax()].tolist())}')
    return coords


def list_coord_files(folder: str):
    """{slide_id: path} of the *.h5 coordinate files of a `patches/` folder, sorted."""
    names = sorted(n for n in storage.listdir(folder)
                   if n.endswith('.h5') and not n.startswith('.'))
    out = {}
    for name in names:
        slide_id = slide_id_of_file(name)
        if slide_id in out:
            raise DataError(f'{folder}: two coordinate files for slide {slide_id!r}')
        out[slide_id] = storage.join(folder, name)
    return out
