"""Whole-slide images: a `Slide` (one level list over its backends: OpenSlide, the reader of
record, and slides/tiles.py's direct TIFF reads) and patches read at a physical resolution
(docs/method.md §9). A slide in a bucket is a RemoteSlide: the local Slide's level list, read
from its tile index's layout (slides/tile_index.py), with remote backends.
"""
import dataclasses
import logging
import math
import os
import threading
from typing import List, Optional, Tuple

import cv2
import numpy as np

from clusiam_jax.errors import DataError

log = logging.getLogger('clusiam_jax')

# What a folder is searched for (`.ome.tif(f)` ends in `.tif(f)`; DICOM: a folder of .dcm).
SLIDE_EXTENSIONS = ('.svs', '.tif', '.tiff', '.ndpi', '.mrxs', '.scn', '.bif', '.vms',
                    '.vmu', '.svslide', '.czi')
DICOM_EXTENSION = '.dcm'
SLIDE_FORMATS = ('Aperio .svs, Hamamatsu .ndpi .vms .vmu, MIRAX .mrxs, Leica .scn, Ventana '
                 '.bif, Sakura .svslide, Zeiss .czi, Philips, generic tiled and OME '
                 '.tif/.tiff, DICOM folders of .dcm')
# Level-0 µm/px no scanner writes; metadata outside it is taken as no µm/px.
MPP_RANGE = (0.05, 100.0)
# Image editors' default dpis, which land in the TIFF tags of images they saved.
EDITOR_DPIS = (72, 96, 150, 300)
# Extensions that are never single patches: found in a patch folder they are flagged.
SLIDE_ONLY_EXTENSIONS = tuple(e for e in SLIDE_EXTENSIONS if e not in ('.tif', '.tiff'))
# OpenSlide's tile cache per process (the slide source shares one among its handles).
TILE_CACHE_BYTES = 64 * 1024 * 1024
# Scanners write downsamples like 4.0002: reading the next finer level costs 4x pixels.
_LEVEL_TOLERANCE = 1e-2
# A thumbnail decoding more pixels than this would take minutes: it is refused.
MAX_THUMBNAIL_READ_PIXELS = 2 ** 30
MAX_THUMBNAIL_PIXELS = 2 ** 28
NO_MPP_ORIGIN = "no µm/px or objective power in the slide's metadata"


class SlideError(DataError):
    """A file that is not a readable slide (missing, truncated, unknown format)."""


class SlideTooLarge(DataError):
    """A thumbnail that would decode too many pixels (thumbnail_problem)."""


@dataclasses.dataclass(frozen=True)
class Resolution:
    """Level-0 µm/px (None: unknown), its origin, why the slide's own was set aside."""
    mpp: Optional[float]
    origin: str
    implausible: str = ''


def implausible_mpp(mpp: float) -> Optional[str]:
    """Why a level-0 µm/px from a slide's metadata is no scan's, else None."""
    for dpi in EDITOR_DPIS:
        if abs(mpp * dpi / 25400 - 1) < 1e-3:
            return (f'level-0 µm/px {mpp:.4g} is the {dpi}-dpi default of image editors, '
                    f"not a scan's")
    low, high = MPP_RANGE
    if mpp > high:
        return f'level-0 µm/px {mpp:.4g} is coarser than any scan (over {high:g})'
    if mpp < low:
        return f'level-0 µm/px {mpp:.4g} is finer than any scan (under {low:g})'
    return None


def level0_resolution(slide, default: Optional[float] = None) -> Resolution:
    """`openslide.mpp-x/y`, else 10 / objective power, else `default` (not for non-square
    pixels: their metadata is wrong otherwise); a value no scan has counts as none."""
    props = slide.properties
    try:
        mpp_x = float(props.get('openslide.mpp-x', 'nan'))
        mpp_y = float(props.get('openslide.mpp-y', 'nan'))
    except ValueError:
        mpp_x = mpp_y = math.nan
    if mpp_x > 0 and mpp_y > 0:
        if abs(mpp_x - mpp_y) > 0.01 * max(mpp_x, mpp_y):
            return Resolution(None, f'non-square pixels ({mpp_x} x {mpp_y} µm)')
        own = Resolution((mpp_x + mpp_y) / 2, 'slide metadata (openslide.mpp-x/y)')
    else:
        try:
            power = float(props.get('openslide.objective-power', 'nan'))
        except ValueError:
            power = math.nan
        own = Resolution(10.0 / power, f'estimated as 10 / objective power {power:g}') \
            if power > 0 else None
    if own is not None:
        problem = implausible_mpp(own.mpp)
        if problem is None:
            return own
        problem = f'{problem} ({own.origin})'
        return Resolution(float(default), 'tile.mpp_default', problem) if default else \
            Resolution(None, own.origin, problem)
    if default:
        return Resolution(float(default), 'tile.mpp_default')
    return Resolution(None, NO_MPP_ORIGIN)


def dicom_file(folder: str, names: Optional[List[str]] = None) -> Optional[str]:
    """The first .dcm of `folder` OpenSlide detects as DICOM WSI (not an annotation or
    report), else the first."""
    import openslide
    if names is None:
        names = os.listdir(folder)
    found = sorted(n for n in names if n.lower().endswith(DICOM_EXTENSION)
                   and not n.startswith('.'))
    for name in found:
        try:
            if openslide.OpenSlide.detect_format(os.path.join(folder, name)) == 'dicom':
                return os.path.join(folder, name)
        except (openslide.OpenSlideError, OSError):
            continue
    return os.path.join(folder, found[0]) if found else None


def slide_id_of(path: str) -> str:
    """A file's name without its (possibly double) extension; a DICOM folder's name."""
    name = os.path.basename(path)
    lower = name.lower()
    if lower.endswith(DICOM_EXTENSION):
        return os.path.basename(os.path.dirname(os.path.abspath(path)))
    for ext in ('.ome.tiff', '.ome.tif'):
        if lower.endswith(ext):
            return name[:-len(ext)]
    return os.path.splitext(name)[0]


# ------------------------------------------------------------------------ the slide

@dataclasses.dataclass(frozen=True)
class Level:
    downsample: float                 # level-0 px per pixel
    size: Tuple[int, int]             # (width, height)
    tile: Optional[Tuple[int, int]]   # the scanner's tile (width, height); None: unknown
    backend: object                   # what reads it: .read(level, x0, y0, w, h)


class Slide:
    """One open slide: the OpenSlide handle, the direct TIFF reader when there is one,
    and one list of levels (OpenSlide's, then the hidden ones); the Slide itself is the
    backend of OpenSlide's."""

    def __init__(self, handle, tiff=None, path: str = ''):   # tiff: a tiles.TiffTiles
        self.handle, self.tiles, self.path = handle, tiff, path or str(handle)
        self.dimensions = tuple(handle.dimensions)
        self.properties = getattr(handle, 'properties', {})
        self.listed = handle.level_count   # the levels OpenSlide lists come first
        direct = getattr(tiff, 'levels', {})
        self.levels = [Level(float(ds), tuple(size), self._tile_of(index),
                             tiff if index in direct else self)
                       for index, (ds, size) in enumerate(zip(handle.level_downsamples,
                                                              handle.level_dimensions))]
        self.levels += [Level(self.dimensions[0] / lv.width, (lv.width, lv.height),
                              (lv.tile_w, lv.tile_h), tiff)
                        for index, lv in sorted(direct.items()) if index >= self.listed]
        self._hidden_failed = False

    def _tile_of(self, level: int) -> Optional[Tuple[int, int]]:
        try:
            w = int(self.properties.get(f'openslide.level[{level}].tile-width', 0))
            h = int(self.properties.get(f'openslide.level[{level}].tile-height', 0))
        except ValueError:
            return None
        return (w, h) if w > 0 and h > 0 else None

    def __str__(self):
        return self.path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.tiles is not None:
            self.tiles.close()
        self.handle.close()

    def best_level(self, downsample: float, listed_only: bool = False) -> int:
        """The coarsest level whose downsample does not exceed `downsample` (within 1%)."""
        levels = self.levels[:self.listed] if listed_only else self.levels
        return coarsest_within([lv.downsample for lv in levels], downsample)

    def tile_size(self, level: int) -> Optional[Tuple[int, int]]:
        return self.levels[level].tile

    def read(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """uint8 [h, w, 3] of `level` from level-0 (x0, y0), white outside the image (over
        white where OpenSlide's RGBA is transparent)."""
        backend = self.levels[level].backend
        if backend is not self:
            return backend.read(level, x0, y0, w, h)
        rgba = np.asarray(self.handle.read_region((int(x0), int(y0)), level, (w, h)))
        rgb, alpha = rgba[..., :3], rgba[..., 3:4]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgb)
        a = alpha.astype(np.uint16)
        return ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)

    def read_square(self, x: int, y: int, size_level0: float, downsample: float):
        """(pixels, side) of the level-0 square at (x, y) from the coarsest level within
        `downsample`; a hidden level that fails falls back to OpenSlide's (said once)."""
        def square(level):
            side = max(1, int(round(size_level0 / self.levels[level].downsample)))
            return self.read(level, x, y, side, side), side

        level = self.best_level(downsample)
        try:
            return square(level)
        except (ValueError, KeyError, IndexError) as e:   # damaged, or given up meanwhile
            if level < self.listed or isinstance(e, DataError):   # DataError: a bucket read
                raise
            if not self._hidden_failed:
                self._hidden_failed = True
                log.warning('%s: level %d (not listed by OpenSlide) unreadable at (%d, %d) '
                            "(%s); such patches are read from OpenSlide's levels", self,
                            level, x, y, e)
            return square(self.best_level(downsample, listed_only=True))

    def drop_hidden_levels(self, why: Exception):
        log.warning('%s: a reduced level OpenSlide does not list is unreadable (%s); '
                    'reading the levels OpenSlide lists instead', self, why)
        self.levels = self.levels[:self.listed]


def coarsest_within(downsamples, downsample: float) -> int:
    """Slide.best_level over a list of level downsamples."""
    best = 0
    for level, ds in enumerate(downsamples):
        if ds <= downsample * (1 + _LEVEL_TOLERANCE):
            best = level if ds >= downsamples[best] else best
    return best


def layout_of(slide: Slide) -> dict:
    """What a host needs to lay out the Slide of this file without opening it (JSON): each
    level's downsample, size and tile, how many OpenSlide lists, which the direct reader reads."""
    return {'dimensions': [int(v) for v in slide.dimensions], 'listed': int(slide.listed),
            'levels': [[lv.downsample, int(lv.size[0]), int(lv.size[1]),
                        *(int(v) for v in (lv.tile or (0, 0)))] for lv in slide.levels],
            'direct': [i for i, lv in enumerate(slide.levels)
                       if slide.tiles is not None and lv.backend is slide.tiles]}


class RemoteSlide(Slide):
    """A slide in a bucket with the local Slide's levels (`layout`: layout_of it). Levels the
    local Slide reads directly and `tiles` (a RemoteTiles) indexes are read by byte ranges;
    the rest (OpenSlide's placement) from the slide staged whole by `stage()` -> Slide, the
    first time one is needed: the same backends as local, so the same pixels."""

    def __init__(self, layout: dict, tiles, stage, path: str):
        self.handle, self.tiles, self.path = None, tiles, path
        self.dimensions = tuple(layout['dimensions'])
        self.properties = {}
        self.listed = int(layout['listed'])
        direct = set(layout['direct']) & set(getattr(tiles, 'levels', {}))
        self.levels = [Level(float(ds), (int(w), int(h)), (int(tw), int(th)) if tw and th
                             else None, tiles if index in direct else self)
                       for index, (ds, w, h, tw, th) in enumerate(layout['levels'])]
        self._stage, self._staged, self._stage_lock = stage, None, threading.Lock()
        self._hidden_failed = False

    def staged(self) -> Slide:
        """The local Slide of the staged copy (staged on first call)."""
        with self._stage_lock:
            if self._staged is None:
                self._staged = self._stage()
            return self._staged

    def read(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        backend = self.levels[level].backend
        if backend is not self:
            return backend.read(level, x0, y0, w, h)
        return self.staged().read(level, x0, y0, w, h)

    def close(self):
        if self.tiles is not None:
            self.tiles.close()
        if self._staged is not None:
            self._staged.close()


def open_slide(path: str, cache=None, direct: bool = True) -> Slide:
    """A Slide with a bounded tile cache (`cache`: shared by the caller's handles) and,
    unless `direct` is False, the direct TIFF reader; SlideError when it is no slide."""
    import openslide  # local: the package import stays light for grain workers

    from clusiam_jax.slides import tiles
    if not os.path.isfile(path):
        raise SlideError(f'{path}: no such file')
    try:
        handle = openslide.OpenSlide(path)
    except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError,
            OSError, ValueError) as e:
        raise SlideError(f'{path}: not a readable slide ({type(e).__name__}: '
                         f'{" ".join(str(e).split()) or "unsupported format"})') from None
    handle.set_cache(cache if cache is not None else
                     openslide.OpenSlideCache(TILE_CACHE_BYTES))
    try:
        return Slide(handle, tiles.TiffTiles.open(path, handle) if direct else None, path)
    except BaseException:
        handle.close()
        raise


# ------------------------------------------------------------------------ reading

def read_patch(slide: Slide, x: int, y: int, size_level0: float, out_size: int
               ) -> np.ndarray:
    """uint8 [out_size, out_size, 3]: the level-0 square at (x, y) of side `size_level0`,
    area-resized from the coarsest level not coarser (so 40x and 20x scans give one patch).
    The square may reach past the slide's edges (a patch at a coarser µm/px around a grid
    square near them): what lies outside is white, as background glass, from every backend
    (OpenSlide's transparent over white, tiles.TiffTiles' own fill)."""
    rgb, side = slide.read_square(x, y, size_level0, size_level0 / out_size)
    if side == out_size:
        return rgb
    interp = cv2.INTER_AREA if side > out_size else cv2.INTER_LINEAR
    return cv2.resize(rgb, (out_size, out_size), interpolation=interp)


def thumbnail_problem(slide: Slide, downsample: float) -> Optional[str]:
    """Why a thumbnail at `downsample` would take minutes, or None."""
    width, height = slide.dimensions
    out_w, out_h = _out_size(slide, downsample)
    if out_w * out_h > MAX_THUMBNAIL_PIXELS:
        return (f'{width} x {height} px at level 0: a thumbnail at {downsample:.4g} level-0 '
                f'px per pixel would be {out_w} x {out_h} px (more than '
                f'{MAX_THUMBNAIL_PIXELS} px); read it at a coarser resolution (tiling: '
                f'tile.tissue_mpp)')
    level = slide.best_level(downsample)
    lv = slide.levels[level]
    lw, lh = lv.size
    if lw * lh > MAX_THUMBNAIL_READ_PIXELS:
        return (f'{width} x {height} px at level 0 and no reduced level near {downsample:.4g} '
                f'level-0 px per pixel: its thumbnail would decode level {level} (downsample '
                f'{lv.downsample:.4g}, {lw} x {lh} px, more than {MAX_THUMBNAIL_READ_PIXELS} '
                f'px); a file whose header claims more pixels than it holds, or one to '
                f'convert to a pyramid (e.g. vips tiffsave --tile --pyramid)')
    return None


def thumbnail(slide: Slide, downsample: float, band_pixels: int = 32 * 1024 * 1024
              ) -> Tuple[np.ndarray, float]:
    """(uint8 RGB image, exact level-0 px per image px in x) of the whole slide at about
    `downsample`, area-resized in bands of at most `band_pixels`; SlideTooLarge first."""
    problem = thumbnail_problem(slide, downsample)
    if problem is not None:
        error = SlideTooLarge(f'{slide}: {problem}')
        error.problem = problem   # without the slide, for a row that names it already
        raise error
    if len(slide.levels) > slide.listed:
        try:
            return _thumbnail(slide, downsample, band_pixels)
        except (ValueError, OSError) as e:   # a damaged tile, a codec tifffile lacks
            slide.drop_hidden_levels(e)
    return _thumbnail(slide, downsample, band_pixels)


def _out_size(slide, downsample):
    return tuple(max(1, int(round(side / downsample))) for side in slide.dimensions)


def _thumbnail(slide, downsample, band_pixels):
    out_w, out_h = _out_size(slide, downsample)
    level = slide.best_level(downsample)
    ds, (lw, lh) = slide.levels[level].downsample, slide.levels[level].size
    out = np.empty((out_h, out_w, 3), np.uint8)
    rows_per_band = max(1, int(band_pixels // max(lw, 1) * out_h // max(lh, 1)))
    for r0 in range(0, out_h, rows_per_band):
        r1 = min(out_h, r0 + rows_per_band)
        y0 = int(round(r0 * lh / out_h))
        y1 = max(int(round(r1 * lh / out_h)), y0 + 1)
        band = slide.read(level, 0, int(round(y0 * ds)), lw, y1 - y0)
        out[r0:r1] = cv2.resize(band, (out_w, r1 - r0), interpolation=cv2.INTER_AREA) \
            if band.shape[:2] != (r1 - r0, out_w) else band
    return out, slide.dimensions[0] / out_w


def thumbnail_for_side(slide: Slide, max_side: int = 2048) -> Tuple[np.ndarray, float]:
    return thumbnail(slide, max(1.0, max(slide.dimensions) / max_side))
