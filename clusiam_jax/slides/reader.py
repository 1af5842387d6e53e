"""Opening whole-slide images and reading patches at a physical resolution (OpenSlide).

OpenSlide reads every format our users scan to (Aperio .svs, Hamamatsu .ndpi/.vms/.vmu,
MIRAX .mrxs, Leica .scn, Ventana .bif, Sakura .svslide, Zeiss .czi, Philips TIFF, generic
pyramidal TIFF and OME-TIFF through libtiff, DICOM WSI: a folder of .dcm instances) and
ships inside the `openslide-bin` wheel (OpenSlide 4.0.1, whose vendors these are).
tiffslide (tifffile-based) reads fewer formats; pyvips brings a second native library.
OpenSlide's own tile cache is bounded per handle (`set_cache`), so a process holding many
slides stays flat.

Resolution (docs/method.md §9): a slide's level-0 µm/px comes from `openslide.mpp-x/y`
(which OpenSlide fills from the vendor's metadata or the TIFF resolution tags); with only
an objective power it is 10 / power (logged as an estimate); with neither it is the
default the user gave for such slides (`tile.mpp_default`), else the slide is refused,
never guessed. A value forced on every slide (`tile.mpp_override`) comes first. A
metadata value no scan has (the 72-dpi default of image editors = 352.8 µm/px, anything
outside MPP_RANGE) counts as none, and says why (`Resolution.implausible`).

A patch of `patch_size` px at `target_mpp` covers `patch_size * target_mpp / level0_mpp`
level-0 pixels. It is read from the pyramid level closest to, but not coarser than,
`target_mpp` and resized to `patch_size` with area averaging (antialiased), so a 40x and a
20x scan of one slide give the same physical patch.
"""
import dataclasses
import logging
import math
import os
from typing import List, Optional, Tuple

import cv2
import numpy as np

from clusiam_jax.errors import DataError

log = logging.getLogger('clusiam_jax')

# What a folder of slides is searched for (lower case; `.ome.tif(f)` ends in `.tif(f)`).
# DICOM is apart: one slide is a folder of .dcm instances (one per level and associated
# image), opened through any of them (dicom_file), its id the folder's name.
SLIDE_EXTENSIONS = ('.svs', '.tif', '.tiff', '.ndpi', '.mrxs', '.scn', '.bif', '.vms',
                    '.vmu', '.svslide', '.czi')
DICOM_EXTENSION = '.dcm'
# The formats these are, for messages and the README (one phrase).
SLIDE_FORMATS = ('Aperio .svs, Hamamatsu .ndpi .vms .vmu, MIRAX .mrxs, Leica .scn, Ventana '
                 '.bif, Sakura .svslide, Zeiss .czi, Philips, generic tiled and OME '
                 '.tif/.tiff, DICOM folders of .dcm')
# Level-0 µm/px no slide scanner writes: finer than light microscopy resolves, or coarser
# than a macro photograph of the slide. Metadata outside it is taken as no µm/px.
MPP_RANGE = (0.05, 100.0)
# Image editors' and printers' default resolutions, which land in the TIFF tags of an
# image saved by them: 25400 / dpi µm/px (72 dpi: 352.8; 300 dpi: 84.67, inside MPP_RANGE).
EDITOR_DPIS = (72, 96, 150, 300)
# Extensions that are never single patches: found in a patch folder they are flagged.
SLIDE_ONLY_EXTENSIONS = tuple(e for e in SLIDE_EXTENSIONS if e not in ('.tif', '.tiff'))
# OpenSlide caches decoded tiles; the slide source gives all the handles of a process one
# cache of this size, so memory does not grow with the number of open slides.
TILE_CACHE_BYTES = 64 * 1024 * 1024
# A level is "as fine as the target" within this tolerance: scanners write downsamples
# like 4.0002, and reading the next finer level for 0.02% costs 4x the pixels.
_LEVEL_TOLERANCE = 1e-2
# The most pixels a thumbnail may decode from the level it is read from, and have itself.
# A 200k x 100k px 40x scan with the usual pyramid (downsamples 1, 4, 16, 64) decodes
# about 78 M px for a thumbnail at 8 µm/px; a file with no reduced level near the
# thumbnail's resolution, or whose header claims far more pixels than it holds (65535 or
# 200000 px a side), would decode gigapixels, for minutes, so its thumbnail is refused.
MAX_THUMBNAIL_READ_PIXELS = 2 ** 30
MAX_THUMBNAIL_PIXELS = 2 ** 28


class SlideError(DataError):
    """A file that is not a readable slide (missing, truncated, unknown format)."""


class SlideTooLarge(DataError):
    """A thumbnail that would decode too many pixels (thumbnail_problem)."""


# The origin of a Resolution whose slide has no µm/px and no objective power (the case
# tile.mpp_default fills in).
NO_MPP_ORIGIN = "no µm/px or objective power in the slide's metadata"


@dataclasses.dataclass(frozen=True)
class Resolution:
    """A slide's level-0 µm per pixel and where it came from (None: unknown, with why);
    `implausible`: why the slide's own value was set aside (implausible_mpp), else ''."""
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


def dicom_file(folder: str, names: Optional[List[str]] = None) -> Optional[str]:
    """The .dcm file of `folder` to open its DICOM slide with (OpenSlide finds the other
    instances of the series beside it): the first, in name order, that OpenSlide detects
    as DICOM WSI (not a DICOM annotation or report), else the first; None without any.
    `names`: the folder's file names, when already listed."""
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


def open_slide(path: str, cache=None):
    """An OpenSlide handle with a bounded tile cache (`cache`, an OpenSlideCache shared by
    the caller's handles, or one of its own); SlideError (one line) otherwise."""
    import openslide  # local: the package import stays light for grain workers
    if not os.path.isfile(path):
        raise SlideError(f'{path}: no such file')
    try:
        slide = openslide.OpenSlide(path)
    except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError,
            OSError, ValueError) as e:
        raise SlideError(f'{path}: not a readable slide ({type(e).__name__}: '
                         f'{" ".join(str(e).split()) or "unsupported format"})') from None
    slide.set_cache(cache if cache is not None else openslide.OpenSlideCache(TILE_CACHE_BYTES))
    return slide


def slide_id_of(path: str) -> str:
    """The slide id of a file: its name without the (possibly double) extension; of a
    DICOM instance, its folder's name (the folder is the slide)."""
    name = os.path.basename(path)
    lower = name.lower()
    if lower.endswith(DICOM_EXTENSION):
        return os.path.basename(os.path.dirname(os.path.abspath(path)))
    for ext in ('.ome.tiff', '.ome.tif'):
        if lower.endswith(ext):
            return name[:-len(ext)]
    return os.path.splitext(name)[0]


def level0_resolution(slide, forced: Optional[float] = None,
                      forced_origin: str = 'tile.mpp', default: Optional[float] = None,
                      default_origin: str = 'tile.mpp_default') -> Resolution:
    """The level-0 µm/px: `forced` when given, else the slide's metadata (see module),
    else `default` when given (a slide whose metadata gives no µm/px nor objective power,
    or one no scan has: its `implausible` says why; not one with non-square pixels,
    whose metadata says something else is wrong)."""
    if forced:
        return Resolution(float(forced), forced_origin)
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
        return Resolution(float(default), default_origin, problem) if default else \
            Resolution(None, own.origin, problem)
    if default:
        return Resolution(float(default), default_origin)
    return Resolution(None, NO_MPP_ORIGIN)


def level_downsamples(slide, tiles=None) -> List[float]:
    """Level-0 px per pixel of every level: OpenSlide's, then those only `tiles` (the
    slide's slides.tiles.TiffTiles) has, an OME-TIFF's hidden levels."""
    extra = tiles.hidden_downsamples(slide) if tiles is not None else []
    return list(slide.level_downsamples) + extra


def best_level(slide, downsample: float, tiles=None) -> int:
    """The coarsest level (of level_downsamples) whose downsample does not exceed
    `downsample` (within 1%)."""
    downsamples = level_downsamples(slide, tiles)
    best = 0
    for level, ds in enumerate(downsamples):
        if ds <= downsample * (1 + _LEVEL_TOLERANCE):
            best = level if ds >= downsamples[best] else best
    return best


def scanner_tile_size(slide, level: int, tiles=None) -> Optional[Tuple[int, int]]:
    """(width, height) of the tiles the scanner stored `level` in, from OpenSlide's
    `openslide.level[N].tile-width/-height` (a hidden level's from `tiles`); None when
    the format does not say."""
    if level >= slide.level_count:
        return tiles.levels[level].tile_w, tiles.levels[level].tile_h
    props = slide.properties
    try:
        w = int(props.get(f'openslide.level[{level}].tile-width', 0))
        h = int(props.get(f'openslide.level[{level}].tile-height', 0))
    except ValueError:
        return None
    return (w, h) if w > 0 and h > 0 else None


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide's RGBA (transparent outside the scanned area) over white."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)
    return ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def read_patch(slide, x: int, y: int, size_level0: float, out_size: int,
               tiles=None) -> np.ndarray:
    """uint8 [out_size, out_size, 3]: the level-0 square at (x, y) of side `size_level0`,
    read from the best level for out_size/size_level0 and area-resized. `tiles`: the
    slide's slides.tiles.TiffTiles, which reads the levels it covers faster and has the
    hidden ones; a hidden level that does not decode there is read from OpenSlide's
    levels instead (said once per reader): slower, the same patch."""
    downsample = size_level0 / out_size
    level = best_level(slide, downsample, tiles)
    try:
        rgb, side = _read_level(slide, tiles, level, x, y, size_level0)
    except (ValueError, KeyError, IndexError) as e:   # damaged, or given up meanwhile
        if level < slide.level_count:
            raise
        if not tiles.fallback_said:
            tiles.fallback_said = True
            log.warning('%s: level %d (not listed by OpenSlide) unreadable at (%d, %d) '
                        "(%s); such patches are read from OpenSlide's levels", slide,
                        level, x, y, e)
        rgb, side = _read_level(slide, tiles, best_level(slide, downsample), x, y,
                                size_level0)
    return _resized(rgb, side, out_size)


def _read_level(slide, tiles, level, x, y, size_level0) -> Tuple[np.ndarray, int]:
    """(the square at level-0 (x, y) of side size_level0 at `level`, its side there):
    through `tiles` when it has the level (a hidden level always: KeyError when it no
    longer has it, never an OpenSlide read of a level OpenSlide does not list)."""
    ds = level_downsamples(slide, tiles)[level]
    side = max(1, int(round(size_level0 / ds)))
    if level >= slide.level_count or (tiles is not None and level in tiles.levels):
        return tiles.read(level, int(round(x / ds)), int(round(y / ds)), side, side), side
    rgba = np.asarray(slide.read_region((int(x), int(y)), level, (side, side)))
    return rgba_to_rgb(rgba), side


def _resized(rgb: np.ndarray, side: int, out_size: int) -> np.ndarray:
    if side == out_size:
        return rgb
    interp = cv2.INTER_AREA if side > out_size else cv2.INTER_LINEAR
    return cv2.resize(rgb, (out_size, out_size), interpolation=interp)


def _band_reader(slide, downsample: float, tiles=None):
    """(level size, function reading rows [y0, y1) of it whole) for the coarsest level not
    coarser than `downsample`, hidden levels of `tiles` included."""
    level = best_level(slide, downsample, tiles)
    if level >= slide.level_count:   # a hidden level
        lv = tiles.levels[level]
        return (lv.width, lv.height), lambda y0, y1: tiles.read(level, 0, y0, lv.width,
                                                                   y1 - y0)
    ds = slide.level_downsamples[level]
    size = slide.level_dimensions[level]

    def openslide_rows(y0, y1):
        return rgba_to_rgb(np.asarray(slide.read_region((0, int(round(y0 * ds))), level,
                                                        (size[0], y1 - y0))))
    return size, openslide_rows


def thumbnail_problem(slide, downsample: float, tiles=None) -> Optional[str]:
    """Why a thumbnail of the whole slide at `downsample` level-0 px per pixel would take
    too long to make (the pixels it decodes, or its own size: see
    MAX_THUMBNAIL_READ_PIXELS), or None."""
    width, height = slide.dimensions
    out_w = max(1, int(round(width / downsample)))
    out_h = max(1, int(round(height / downsample)))
    if out_w * out_h > MAX_THUMBNAIL_PIXELS:
        return (f'{width} x {height} px at level 0: a thumbnail at {downsample:.4g} level-0 '
                f'px per pixel would be {out_w} x {out_h} px (more than '
                f'{MAX_THUMBNAIL_PIXELS} px); read it at a coarser resolution (tiling: '
                f'tile.tissue_mpp)')
    level = best_level(slide, downsample, tiles)
    if level >= slide.level_count:
        lw, lh = tiles.levels[level].width, tiles.levels[level].height
    else:
        lw, lh = slide.level_dimensions[level]
    if lw * lh > MAX_THUMBNAIL_READ_PIXELS:
        ds = level_downsamples(slide, tiles)[level]
        return (f'{width} x {height} px at level 0 and no reduced level near {downsample:.4g} '
                f'level-0 px per pixel: its thumbnail would decode level {level} (downsample '
                f'{ds:.4g}, {lw} x {lh} px, more than {MAX_THUMBNAIL_READ_PIXELS} px); a file '
                f'whose header claims more pixels than it holds, or one to convert to a '
                f'pyramid (e.g. vips tiffsave --tile --pyramid)')
    return None


def thumbnail(slide, downsample: float, band_pixels: int = 32 * 1024 * 1024,
              tiles=None) -> Tuple[np.ndarray, float]:
    """(uint8 RGB image, exact level-0 px per image px in x) of the whole slide at about
    `downsample` level-0 pixels per pixel: read from the best level (with `tiles`, the
    slide's slides.tiles.TiffTiles, also the hidden levels OpenSlide does not list) in
    horizontal bands of at most `band_pixels` (a slide without a pyramid is never read
    whole) and area-resized band by band. Hidden levels that fail to decode somewhere
    are given up (dropped from `tiles`, for later reads too) for OpenSlide's levels,
    with a warning: slower, never wrong. SlideTooLarge (one line) before reading anything
    when that would take minutes (thumbnail_problem)."""
    problem = thumbnail_problem(slide, downsample, tiles)
    if problem is not None:
        error = SlideTooLarge(f'{slide}: {problem}')
        error.problem = problem   # without the slide, for a row that names it already
        raise error
    if tiles is not None and tiles.hidden_downsamples(slide):
        try:
            return _thumbnail(slide, downsample, band_pixels, tiles)
        except (ValueError, OSError) as e:   # a damaged tile, a codec tifffile lacks
            log.warning('%s: a reduced level OpenSlide does not list is unreadable (%s); '
                        'reading the levels OpenSlide lists instead', slide, e)
            tiles.drop_hidden_levels(slide)
    return _thumbnail(slide, downsample, band_pixels, None)


def _thumbnail(slide, downsample, band_pixels, tiles):
    width, height = slide.dimensions
    out_w = max(1, int(round(width / downsample)))
    out_h = max(1, int(round(height / downsample)))
    (lw, lh), read_rows = _band_reader(slide, downsample, tiles)
    out = np.empty((out_h, out_w, 3), np.uint8)
    rows_per_band = max(1, int(band_pixels // max(lw, 1) * out_h // max(lh, 1)))
    for r0 in range(0, out_h, rows_per_band):
        r1 = min(out_h, r0 + rows_per_band)
        y0, y1 = int(round(r0 * lh / out_h)), max(int(round(r1 * lh / out_h)),
                                                   int(round(r0 * lh / out_h)) + 1)
        band = read_rows(y0, y1)
        out[r0:r1] = cv2.resize(band, (out_w, r1 - r0), interpolation=cv2.INTER_AREA) \
            if band.shape[:2] != (r1 - r0, out_w) else band
    return out, width / out_w


def thumbnail_for_side(slide, max_side: int = 2048, tiles=None
                       ) -> Tuple[np.ndarray, float]:
    """A thumbnail whose longest side is at most `max_side` (and not above level 0)."""
    downsample = max(1.0, max(slide.dimensions) / max_side)
    return thumbnail(slide, downsample, tiles=tiles)
