r"""`--mode tile`: a folder (or CSV) of slides -> per-slide patch coordinates.

  python launch.py --mode tile --config configs/<recipe>.py \
      --config.tile.slides=DIR_OR_CSV --config.tile.out_dir=DIR

The slides: every slide file under the folder (reader.SLIDE_EXTENSIONS), and each folder
holding DICOM instances (.dcm) as one slide named after that folder; the other files are
counted in one log line (`skipped 12 files that are not slides: 8 .txt, 4 .json`).

For each slide (docs/formats.md, "Tiling output"):
  <out_dir>/patches/<slide_id>_patches.h5   coords at level 0 + TRIDENT's attributes
  <out_dir>/masks/<slide_id>.png            QC: thumbnail, tissue contour, kept grid, and
                                            in words (also in the PNG's "Title" text) the
                                            keys and sizes in µm, a scale bar; a slide
                                            without a usable µm/px gets its thumbnail and
                                            tissue, with what to set
  <out_dir>/slides.csv                      one row per slide: resolution and its origin,
                                            patch count, tissue fraction, status, reason

The grid: patches of `tile.patch_size` px at `tile.target_mpp` µm/px, i.e.
round(patch_size * target_mpp / level0_mpp) level-0 px, stepped by (patch_size - overlap)
at the same scale from the slide's top-left corner, whole patches only, row by row
(`tile.align`: on the scanner's tiles instead, slides/aligned_grid.py). A patch is
kept when at least `tile.min_tissue` of it is tissue (tissue.py, or the polygons of
`tile.masks`). Everything is a function of the slide and the config, so the
coordinates are the same on every rerun.

A slide's level-0 µm/px, first found first: the slide CSV's `mpp` column,
`tile.mpp_override` (forced on every slide; a slide whose metadata it contradicts is
logged with both values and their ratio, and says so in its row), the slide's metadata
(reader.level0_resolution: µm/px, else 10 / objective power), `tile.mpp_default` (only
for slides whose metadata has neither, or a value no scan has: reader.implausible_mpp),
else the slide is a `no_mpp` row, or `bad_mpp` when its metadata has such a value (the
72-dpi default of image editors, 352.8 µm/px), naming the key that fixes it.

Slides are tiled by a process pool; a slide that cannot be read, has no resolution or
no tissue, an id that is no file name (every file of a slide is named by its id, inside
`out_dir`: slides/coords.py), an id another slide of the list has too, or a size whose
thumbnail would take minutes to decode is a row with its status and reason, never the
end of the job. Failing to write the output (a full disk) is the job's error, not the
slide's: the job stops, its finished slides kept. A rerun reuses every slide whose file
carries the same `tiling_key` (config + file size and modification time) and, when its
µm/px came from `tile.mpp_default`, the same default; it redoes the others, with one
line per slide saying what changed; slides.csv is read again before each write, so the
rows of slides this job does not (yet) redo stay as they are.
"""
import concurrent.futures
import contextlib
import csv
import dataclasses
import errno
import hashlib
import json
import logging
import multiprocessing
import os
import time
import zlib
from typing import Dict, List, Optional

import cv2
import numpy as np
import tqdm

from clusiam_jax import fileio, interrupts
from clusiam_jax.errors import ConfigError, DataError
from clusiam_jax.fileio import atomic_write
from clusiam_jax.slides import aligned_grid, reader, tiles, tissue
from clusiam_jax.slides import coords as coords_lib

log = logging.getLogger('clusiam_jax')

SLIDES_CSV = 'slides.csv'
MASKS_DIR = 'masks'
SLIDES_FIELDS = ('slide_id', 'path', 'label', 'level0_mpp', 'mpp_origin', 'n_patches',
                 'tissue_fraction', 'status', 'reason')
# status values of slides.csv
TILED, NO_TISSUE, NO_MPP, UNREADABLE = 'tiled', 'no_tissue', 'no_mpp', 'unreadable'
BAD_ID, TOO_LARGE, DUPLICATE_ID = 'bad_id', 'too_large', 'duplicate_id'
BAD_MPP = 'bad_mpp'   # the slide's metadata µm/px is no scan's (reader.implausible_mpp)
# mpp_origin of a µm/px from the config
OVERRIDE_ORIGIN, DEFAULT_ORIGIN = 'tile.mpp_override', 'tile.mpp_default'
# What a full disk or quota looks like, also inside h5py's messages (no errno there).
_FULL = (errno.ENOSPC, errno.EDQUOT)


class OutputError(DataError):
    """Writing the job's output failed (a full disk, a read-only folder): an error of the
    job, which stops, not of the slide being written."""


@contextlib.contextmanager
def _writing(path: str):
    """Turns a failure to write `path` into the job's OutputError (one line)."""
    try:
        yield
    except OSError as e:
        text = ' '.join(str(e).split())
        if e.errno in _FULL or any(os.strerror(c) in text for c in _FULL):
            raise OutputError(f'out of space writing {path}: free space and rerun; finished '
                              f'slides are kept') from None
        raise OutputError(f'cannot write {path} ({e.strerror or text}): fix the output '
                          f'folder and rerun; finished slides are kept') from None
QC_MAX_SIDE = 1024


@dataclasses.dataclass(frozen=True)
class SlideEntry:
    """A slide to tile: from a folder (path only) or a CSV row."""
    slide_id: str
    path: str
    mpp: Optional[float] = None   # the CSV's `mpp` column
    label: str = ''


@dataclasses.dataclass(frozen=True)
class TileParams:
    """The `tile` config section (config.py has the defaults and the checks)."""
    target_mpp: float
    patch_size: int
    overlap: int
    min_tissue: float
    mpp_override: float           # forced on every slide; 0: from the slide
    masks: str                    # '' : detect tissue
    detection: tissue.TissueParams
    align: bool = False           # patches laid on the scanner's tiles (aligned_grid.py)
    mpp_default: float = 0.0      # for slides whose metadata has no µm/px; 0: none

    @classmethod
    def from_config(cls, tile):
        return cls(float(tile.target_mpp), int(tile.patch_size), int(tile.overlap),
                   float(tile.min_tissue), float(tile.mpp_override or 0),
                   str(tile.masks or ''), tissue.TissueParams.from_config(tile),
                   bool(tile.align), float(tile.mpp_default or 0))


# ------------------------------------------------------------------- the slide list

# Files a slide beside them needs, by the extension of that slide: not slides themselves,
# nor files left out (VMS/VMU: the JPEG tiles and the optimisation file they list).
_SIDECARS = {'.vms': ('.jpg', '.jpeg', '.opt'), '.vmu': ('.jpg', '.jpeg', '.opt')}


def _find_slides(folder: str):
    """(the slides under `folder`, at any depth: slide files, and each folder of DICOM
    instances as one slide named after the folder; {extension: count} of the other files,
    those the slides beside them need apart). Hidden files and folders are left out, and
    so is a MIRAX slide's data folder (`X/` beside `X.mrxs`)."""
    found, skipped = [], {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        names = sorted(n for n in filenames if not n.startswith('.'))
        lower = [n.lower() for n in names]
        mirax = {os.path.splitext(n)[0] for n, low in zip(names, lower)
                 if low.endswith('.mrxs')}
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.') and d not in mirax)
        needed = tuple(e for low in lower for ext, sidecars in _SIDECARS.items()
                       if low.endswith(ext) for e in sidecars)
        if any(low.endswith(reader.DICOM_EXTENSION) for low in lower):
            found.append(SlideEntry(os.path.basename(dirpath),
                                    reader.dicom_file(dirpath, names)))
        for name, low in zip(names, lower):
            if low.endswith(reader.SLIDE_EXTENSIONS):
                path = os.path.join(dirpath, name)
                found.append(SlideEntry(reader.slide_id_of(path), path))
            elif not low.endswith((reader.DICOM_EXTENSION,) + needed):
                ext = os.path.splitext(low)[1] or 'without extension'
                skipped[ext] = skipped.get(ext, 0) + 1
    return sorted(found, key=lambda e: e.path), skipped


def _skipped_line(skipped: Dict[str, int]) -> str:
    """'12 files that are not slides: 8 .txt, 4 .json' ('' when none)."""
    if not skipped:
        return ''
    n = sum(skipped.values())
    kinds = ', '.join(f'{c} {e}' for e, c in sorted(skipped.items(), key=lambda i: (-i[1], i[0])))
    return f'{n} file{"s" if n > 1 else ""} that {"are" if n > 1 else "is"} not slides: {kinds}'


def _read_slide_csv(path: str) -> List[SlideEntry]:
    base = os.path.dirname(os.path.abspath(path))
    # One reader for every CSV a user gives: a BOM, a non-UTF-8 file, a broken one.
    columns, rows = fileio.read_csv_rows(path, 'tile.slides CSV')
    if 'path' not in columns:
        raise DataError(f'{path} has no "path" column (columns: {columns}); expected '
                        f'path[,slide_id][,mpp][,label]')
    entries = []
    for line, row in enumerate(rows, start=2):
        raw = (row.get('path') or '').strip()
        if not raw:
            raise DataError(f'{path}:{line}: empty "path"')
        slide_path = raw if os.path.isabs(raw) else os.path.join(base, raw)
        slide_path = _dicom_folder_file(os.path.abspath(slide_path))
        mpp_text = (row.get('mpp') or '').strip()
        try:
            mpp = float(mpp_text) if mpp_text else None
        except ValueError:
            raise DataError(f'{path}:{line}: "mpp" is not a number: {mpp_text!r}') from None
        if mpp is not None and not mpp > 0:
            raise DataError(f'{path}:{line}: "mpp" must be positive, got {mpp_text}')
        entries.append(SlideEntry((row.get('slide_id') or '').strip()
                                  or reader.slide_id_of(slide_path), slide_path, mpp,
                                  (row.get('label') or '').strip()))
    return entries


def _dicom_folder_file(path: str) -> str:
    """A folder of DICOM instances -> the file it is opened through; other paths as they
    are."""
    if os.path.isdir(path):
        return reader.dicom_file(path) or path
    return path


def list_slides(slides: str) -> List[SlideEntry]:
    """The slides of `tile.slides`: a folder searched recursively (each folder of DICOM
    instances one slide), a CSV, or one slide. The files of a folder that are not slides
    are counted in one log line."""
    if not slides:
        raise ConfigError('tile.slides is empty: give a folder of slides or a CSV with a '
                          '"path" column (--config.tile.slides=...)')
    if not os.path.exists(slides):
        raise DataError(f'tile.slides not found: {slides}')
    slides = os.path.abspath(slides)   # slides.csv records where the slides are, for good
    if os.path.isfile(slides):
        if slides.lower().endswith(reader.SLIDE_EXTENSIONS + (reader.DICOM_EXTENSION,)):
            entries = [SlideEntry(reader.slide_id_of(slides), slides)]
        elif not slides.lower().endswith('.csv'):
            raise DataError(f'tile.slides {slides} is neither a slide file '
                            f'({reader.SLIDE_FORMATS}) nor a CSV of slides')
        else:
            entries = _read_slide_csv(slides)
    else:
        entries, skipped = _find_slides(slides)
        others = _skipped_line(skipped)
        if not entries:
            raise DataError(f'no slide files ({reader.SLIDE_FORMATS}) under {slides}'
                            + (f'; it has {others}' if others else ''))
        if others:
            log.warning('tile: skipped %s (under %s)', others, slides)
    if not entries:
        raise DataError(f'{slides} lists no slides')
    return entries   # slides sharing an id are rows of their own (tile_slides)


def _duplicate_rows(entries: List[SlideEntry]) -> Dict[int, dict]:
    """{index in entries: its row} of every slide whose id another slide has too. None
    of them is tiled: their files would be one, and picking one would be arbitrary."""
    paths: Dict[str, List[str]] = {}
    for e in entries:
        paths.setdefault(e.slide_id, []).append(e.path)
    rows = {}
    for i, e in enumerate(entries):
        group = paths[e.slide_id]
        if len(group) < 2:
            continue
        others = sorted(group)
        others.remove(e.path)
        where = ('listed again' if all(p == e.path for p in others) else
                 f'also {", ".join(others)}')
        rows[i] = _row(e, DUPLICATE_ID, f'{len(group)} slides have the id {e.slide_id!r} '
                       f'({where}); none of them is tiled: give each its own id (the '
                       f'slide_id column of a slide CSV, tile.slides=slides.csv) or remove '
                       f'the copies')
    return rows


# -------------------------------------------------------------------- one slide

def _file_identity(path: Optional[str]):
    if not path:
        return None
    try:
        st = os.stat(path)
        return [os.path.abspath(path), st.st_size, int(st.st_mtime)]
    except OSError:
        return [os.path.abspath(path), None, None]


def _key_inputs(entry: SlideEntry, params: TileParams) -> dict:
    """What tiling_key hashes, as the coordinate file records it (`tiling_inputs`), so
    a rerun can say what changed. tile.mpp_default is not part of the key (it changes
    only the slides whose µm/px came from it: _previous); tile.mpp_override is, as `mpp`,
    its name before it was split in two."""
    mask = None
    if params.masks:
        from clusiam_jax.slides import annotations
        mask = _file_identity(annotations.find_annotation_file(params.masks, entry.slide_id))
    settings = dataclasses.asdict(params)
    settings['mpp'] = settings.pop('mpp_override')   # tilings made before keep their key
    del settings['mpp_default']
    if not settings['align']:   # tilings made before the option keep their key
        del settings['align']
    return {'file': _file_identity(entry.path), 'mask': mask, 'mpp_column': entry.mpp,
            'settings': settings}


def tiling_key(entry: SlideEntry, params: TileParams) -> str:
    """Config + the slide file's identity (+ its mask file's): a rerun reuses a slide's
    coordinates only when equal."""
    inputs = _key_inputs(entry, params)
    payload = json.dumps([inputs['file'], inputs['mask'], inputs['mpp_column'],
                          inputs['settings']], sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()


def grid(width: int, height: int, size0: int, step0: int) -> np.ndarray:
    """int64 [N, 2] top-left corners of the whole patches, row by row."""
    xs = np.arange(0, width - size0 + 1, step0, dtype=np.int64)
    ys = np.arange(0, height - size0 + 1, step0, dtype=np.int64)
    return mesh(xs, ys)


def mesh(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """int64 [N, 2]: every (x, y) of the starts along each axis, row by row."""
    yy, xx = np.meshgrid(ys, xs, indexing='ij')
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def cell_fractions(mask: np.ndarray, coords: np.ndarray, size0: float,
                   downsample: float) -> np.ndarray:
    """Fraction of each patch's area that is tissue, from a mask at `downsample` level-0
    px per pixel (an integral image: exact over the mask's pixels)."""
    if not len(coords):
        return np.zeros(0)
    integral = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_64F)
    h, w = mask.shape
    x0 = np.clip(np.round(coords[:, 0] / downsample).astype(np.int64), 0, w)
    y0 = np.clip(np.round(coords[:, 1] / downsample).astype(np.int64), 0, h)
    x1 = np.clip(np.round((coords[:, 0] + size0) / downsample).astype(np.int64), 0, w)
    y1 = np.clip(np.round((coords[:, 1] + size0) / downsample).astype(np.int64), 0, h)
    x1, y1 = np.maximum(x1, x0 + 1).clip(max=w), np.maximum(y1, y0 + 1).clip(max=h)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return total / area


def _row(entry: SlideEntry, status: str, reason: str = '', mpp=None, origin='',
         n=0, fraction=None) -> dict:
    return {'slide_id': entry.slide_id, 'path': entry.path, 'label': entry.label,
            'level0_mpp': '' if mpp is None else f'{mpp:.6g}', 'mpp_origin': origin,
            'n_patches': n, 'tissue_fraction': '' if fraction is None else f'{fraction:.4f}',
            'status': status, 'reason': reason}


def _resolution(slide, entry: SlideEntry, params: TileParams):
    """(the slide's level-0 reader.Resolution, a note when tile.mpp_override contradicts
    the slide's metadata, else ''); the order is the module's."""
    if entry.mpp:
        return reader.Resolution(entry.mpp, "the slide list's mpp column"), ''
    own = reader.level0_resolution(slide, default=params.mpp_default or None,
                                   default_origin=DEFAULT_ORIGIN)
    if not params.mpp_override:
        if own.mpp is not None and own.implausible:
            return own, f'{DEFAULT_ORIGIN} {own.mpp:g} used: {own.implausible}'
        return own, ''
    forced = reader.Resolution(params.mpp_override, OVERRIDE_ORIGIN)
    if own.mpp is None or own.origin == DEFAULT_ORIGIN or \
            abs(forced.mpp / own.mpp - 1) < 1e-3:
        return forced, ''
    return forced, (f"{OVERRIDE_ORIGIN} {forced.mpp:g} replaces the slide's level-0 µm/px "
                    f'{own.mpp:.4g} ({own.origin}): x{forced.mpp / own.mpp:.3g}')


def _no_mpp_reason(res: reader.Resolution) -> str:
    if res.implausible:
        return (f'{res.implausible}: set --config.tile.mpp_default=... (used for slides '
                f'without a usable µm/px) or the slide CSV\'s "mpp" column '
                f'(tile.slides=slides.csv)')
    if res.origin == reader.NO_MPP_ORIGIN:
        return (f'{res.origin}: give it with --config.tile.mpp_default=... (used only for '
                f'slides without µm/px) or in an "mpp" column of a slide CSV '
                f'(tile.slides=slides.csv)')
    return (f'{res.origin}: give its µm/px in an "mpp" column of a slide CSV '
            f'(tile.slides=slides.csv), or --config.tile.mpp_override=... when every slide '
            f'of the list has that µm/px')


def _no_mpp_title(res: reader.Resolution) -> str:
    """The QC picture's words for a slide without a usable µm/px: what, and the fix."""
    if res.implausible:
        return f'{res.implausible}: set tile.mpp_default or the CSV mpp column'
    if res.origin == reader.NO_MPP_ORIGIN:
        return 'no µm/px: set tile.mpp_default or the CSV mpp column'
    return f'{res.origin}: set the CSV mpp column'


# The QC picture is at least this wide, so its words stay readable over a narrow slide.
QC_MIN_WIDTH = 720
QC_GREEN, QC_BLUE = (0, 170, 0), (30, 60, 220)
# Without µm/px: the holes filled and the specks dropped, as shares of the picture.
QC_HOLE_SHARE, QC_SPECK_SHARE = 1e-3, 2e-4


def _qc_picture(thumb, mask_small, coords, size0, downsample, lines,
                thumb_mpp: Optional[float]) -> np.ndarray:
    """Thumbnail, tissue contour (green) and kept patches (blue squares) under `lines` of
    words, with a scale bar in µm when `thumb_mpp` (µm per thumbnail px) is known."""
    from PIL import Image, ImageDraw
    image = thumb.copy()
    h, w = image.shape[:2]
    contour_mask = cv2.resize(mask_small.astype(np.uint8), (w, h),
                              interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(contour_mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    thick = max(1, round(max(h, w) / 600))
    cv2.drawContours(image, contours, -1, QC_GREEN, thick, cv2.LINE_AA)
    for x, y in coords:
        p0 = (int(x / downsample), int(y / downsample))
        p1 = (int((x + size0) / downsample) - 1, int((y + size0) / downsample) - 1)
        cv2.rectangle(image, p0, p1, QC_BLUE, 1)
    font, micro = _qc_font(15)
    if not micro:
        lines = [line.replace('µ', 'u') for line in lines]
    width = max(w, QC_MIN_WIDTH)
    text = [part for line in lines for part in _wrapped(line, font, width - 12)]
    line_h = 20
    band = len(text) * line_h + 10
    canvas = Image.new('RGB', (width, band + h), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, band))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(text):
        draw.text((6, 5 + i * line_h), line, fill=(0, 0, 0), font=font)
    if thumb_mpp:
        _scale_bar(draw, font, thumb_mpp, w, band + h, 'µm' if micro else 'um')
    return np.asarray(canvas)


def _qc_font(size: int):
    """(a scalable font, whether it draws µ): DejaVu Sans where the system has it, else
    Pillow's own (which has no µ: the picture then says um; its PNG text keeps µm)."""
    from PIL import ImageFont
    try:
        font = ImageFont.truetype('DejaVuSans.ttf', size)
    except OSError:
        try:
            font = ImageFont.load_default(size)
        except (TypeError, OSError):   # without FreeType: a bitmap font, ASCII
            return ImageFont.load_default(), False
    missing = font.getmask('\uffff')
    micro = font.getmask('µ')
    return font, (micro.size != missing.size or bytes(micro) != bytes(missing))


def _wrapped(line: str, font, width: int) -> List[str]:
    """`line` broken at spaces into pieces at most `width` px wide in `font`."""
    out, current = [], ''
    for word in line.split(' '):
        trial = f'{current} {word}' if current else word
        if current and font.getlength(trial) > width:
            out.append(current)
            current = word
        else:
            current = trial
    return out + [current]


def _scale_bar(draw, font, mpp: float, w: int, bottom: int, um: str):
    """A bar of a round length in µm (about a fifth of the width) at the bottom left."""
    target = w * mpp / 5
    length = max((m * 10 ** e for e in range(-1, 6) for m in (1, 2, 5)
                  if m * 10 ** e <= target), default=0.1)
    px = max(1, round(length / mpp))
    label = f'{length / 1000:g} mm' if length >= 1000 else f'{length:g} {um}'
    label_w = font.getlength(label)
    x0, y1 = 8, bottom - 8
    draw.rectangle((x0 - 4, y1 - 30, x0 + max(px, label_w) + 4, y1 + 4), fill=(255, 255, 255))
    draw.rectangle((x0, y1 - 6, x0 + px, y1), fill=(0, 0, 0))
    draw.text((x0, y1 - 28), label, fill=(0, 0, 0), font=font)


def _write_qc(out_dir: str, entry: SlideEntry, picture: np.ndarray, lines: List[str]) -> str:
    """masks/<id>.png, its words also in the PNG's text ("Title")."""
    ok, encoded = cv2.imencode('.png', cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    path = coords_lib.slide_path(os.path.join(out_dir, MASKS_DIR), entry.slide_id, '.png')
    with _writing(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_write(path) as tmp, open(tmp, 'wb') as f:
            f.write(_with_text(encoded.tobytes(), 'Title', '\n'.join(lines)))
    return path


def _with_text(png: bytes, key: str, text: str) -> bytes:
    """`png` with an iTXt chunk (UTF-8 text) after its header chunk."""
    data = key.encode('latin-1') + b'\0\0\0\0\0' + text.encode('utf-8')
    chunk = (len(data).to_bytes(4, 'big') + b'iTXt' + data
             + zlib.crc32(b'iTXt' + data).to_bytes(4, 'big'))
    end_of_header = 8 + 4 + 4 + 13 + 4   # signature, IHDR's length, type, data, CRC
    return png[:end_of_header] + chunk + png[end_of_header:]


def _no_grid_row(slide, direct, entry, params, out_dir, status, reason, title) -> dict:
    """The row of a slide without a usable µm/px (none, or one no scan has), after its QC
    picture: the thumbnail and its tissue, no grid, `title` saying what to set. A slide
    whose thumbnail cannot be made keeps its row, which says so."""
    try:
        picture = _no_grid_picture(slide, direct, entry, params, title)
    except OutputError:
        raise
    except Exception as e:  # a slide whose pixels do not decode: its row says what it is
        log.debug('tile: %s: no QC picture', entry.slide_id, exc_info=True)
        return _row(entry, status, f'{reason}; no QC picture ({entry.path}: '
                    f'{type(e).__name__}: {" ".join(str(e).split())})')
    if picture is not None:
        _write_qc(out_dir, entry, *picture)
    return _row(entry, status, reason)


def _no_grid_picture(slide, direct, entry, params, title):
    downsample = max(1.0, max(slide.dimensions) / QC_MAX_SIDE)
    if reader.thumbnail_problem(slide, downsample, direct) is not None:
        return None
    thumb, ds = reader.thumbnail(slide, downsample, tiles=direct)
    # Holes and specks by their share of the picture (the keys in µm² need µm/px).
    area = thumb.shape[0] * thumb.shape[1]
    by_share = dataclasses.replace(params.detection, max_hole_um2=area * QC_HOLE_SHARE,
                                   min_area_um2=area * QC_SPECK_SHARE)
    mask = tissue.tissue_mask(thumb, 1.0, by_share)
    lines = [f'{entry.slide_id}: no patch grid', title,
             f'green: tissue, holes under {QC_HOLE_SHARE:.1%} and specks under '
             f'{QC_SPECK_SHARE:.2%} of the picture left out (tile.max_hole_um2 and '
             f'tile.min_area_um2 need µm/px)']
    return _qc_picture(thumb, mask, np.zeros((0, 2), np.int64), 1, ds, lines, None), lines


def _bad_id_row(entry: SlideEntry) -> Optional[dict]:
    """The row of a slide whose id cannot name its files, else None."""
    problem = coords_lib.id_problem(entry.slide_id)
    if problem is None:
        return None
    return _row(entry, BAD_ID, f"slide id {entry.slide_id!r} {problem}: it names the slide's "
                f'files, so give it a plain file name (the slide_id column of the slide CSV)')


def tile_slide(entry: SlideEntry, params: TileParams, out_dir: str) -> dict:
    """Tiles one slide; returns its slides.csv row (never raises for a bad slide; raises
    OutputError when its output cannot be written)."""
    bad = _bad_id_row(entry)
    if bad is not None:
        return bad
    try:
        slide = reader.open_slide(entry.path)
    except DataError as e:
        return _row(entry, UNREADABLE, str(e))
    try:
        with tiles.opened(entry.path, slide) as direct:
            return _tile_open_slide(slide, direct, entry, params, out_dir)
    except OutputError:
        raise
    except reader.SlideTooLarge as e:
        return _row(entry, TOO_LARGE, getattr(e, 'problem', str(e)))
    except Exception as e:  # a truncated file fails while reading its pixels; any failure
        # of one slide is that slide's row, never the end of the job
        log.debug('tile: %s failed', entry.slide_id, exc_info=True)
        return _row(entry, UNREADABLE, f'{entry.path}: {type(e).__name__}: '
                    f'{" ".join(str(e).split())}')
    finally:
        slide.close()


def _tile_open_slide(slide, direct, entry, params, out_dir) -> dict:
    """`direct`: the slide's slides.tiles.TiffTiles (or None), for its hidden levels."""
    res, mpp_note = _resolution(slide, entry, params)
    if res.mpp is None:
        return _no_grid_row(slide, direct, entry, params, out_dir,
                            BAD_MPP if res.implausible else NO_MPP, _no_mpp_reason(res),
                            _no_mpp_title(res))
    if res.origin.startswith('estimated'):
        log.warning('%s: level-0 µm/px %s (%s)', entry.slide_id, f'{res.mpp:.4g}', res.origin)
    width, height = slide.dimensions
    size0 = int(round(params.patch_size * params.target_mpp / res.mpp))
    step0 = int(round((params.patch_size - params.overlap) * params.target_mpp / res.mpp))
    if size0 < 1 or step0 < 1:
        return _row(entry, NO_MPP, f'level-0 µm/px {res.mpp} makes a patch of {size0} px')
    # The detection image, never finer than level 0.
    ds = max(1.0, params.detection.tissue_mpp / res.mpp)
    too_large = reader.thumbnail_problem(slide, ds, direct)
    if too_large is not None:
        return _row(entry, TOO_LARGE, too_large, res.mpp, res.origin)
    small, ds = reader.thumbnail(slide, ds, tiles=direct)
    if params.masks:
        mask = _supplied_mask(params.masks, entry, small.shape[:2], ds)
        if mask is None:
            return _row(entry, NO_TISSUE, f'no annotation file for {entry.slide_id} in '
                        f'tile.masks {params.masks}', res.mpp, res.origin)
    else:
        mask = tissue.tissue_mask(small, res.mpp * ds, params.detection)
    candidates, grid_attrs, align_note = _candidates(slide, direct, entry, params, size0,
                                                     step0)
    note = '; '.join(n for n in (mpp_note, align_note) if n)
    fractions = cell_fractions(mask, candidates, size0, ds)
    keep = (fractions >= params.min_tissue) & (fractions > 0)
    kept = candidates[keep]
    tissue_fraction = float(mask.mean())
    attrs = {'patch_size': params.patch_size, 'patch_size_level0': size0,
             'level0_magnification': 10.0 / res.mpp,
             'target_magnification': 10.0 / params.target_mpp,
             'overlap': params.overlap, 'level0_width': width, 'level0_height': height,
             'name': entry.slide_id, 'target_mpp': params.target_mpp,
             'level0_mpp': res.mpp, 'mpp_origin': res.origin, 'slide_path':
             os.path.abspath(entry.path), 'tiling_key': tiling_key(entry, params),
             'tiling_inputs': json.dumps(_key_inputs(entry, params), sort_keys=True,
                                         default=str),
             'tissue_fraction': float(mask.mean()), 'tiling_note': note, **grid_attrs}
    lines = [f'{entry.slide_id}: {len(kept)} patches kept',
             f'patch tile.patch_size {params.patch_size} px at tile.target_mpp '
             f'{params.target_mpp:g} µm/px = {params.patch_size * params.target_mpp:g} µm '
             f'({size0} px at level 0); tile.overlap {params.overlap}; tile.min_tissue '
             f'{params.min_tissue:g}',
             f'level-0 µm/px {res.mpp:.4g} ({res.origin}); green: tissue, blue: kept patches']
    qc_thumb, qc_ds = reader.thumbnail_for_side(slide, QC_MAX_SIDE, direct)
    qc = _qc_picture(qc_thumb, mask, kept, size0, qc_ds, lines, res.mpp * qc_ds)
    qc_path = _write_qc(out_dir, entry, qc, lines)
    if not len(kept):
        return _row(entry, NO_TISSUE, f'no patch with tissue >= tile.min_tissue '
                    f'{params.min_tissue:g} (tissue {tissue_fraction:.1%} of the slide; see '
                    f'{qc_path})', res.mpp, res.origin, 0, tissue_fraction)
    coords_path = coords_lib.trident_file(out_dir, entry.slide_id)
    with _writing(coords_path):
        coords_lib.write_trident(coords_path, kept, attrs)
    return _row(entry, TILED, note, res.mpp, res.origin, len(kept), tissue_fraction)


def _candidates(slide, direct, entry, params, size0, step0):
    """(every patch corner before the tissue test, the coordinate file's attributes that
    say which grid, why tile.align did not apply or '')."""
    if params.align:
        aligned = aligned_grid.aligned_grid(slide, size0, params.patch_size, direct)
        if not isinstance(aligned, str):
            return mesh(aligned.xs, aligned.ys), {'aligned_to_tiles': np.array(
                [aligned.tile[0], aligned.tile[1], aligned.level], np.int64)}, ''
        note = f'tile.align: {aligned}; tiled on the regular grid'   # aligned: the reason
        log.warning('%s: %s', entry.slide_id, note)
    else:
        note = ''
    width, height = slide.dimensions
    return grid(width, height, size0, step0), {'step_level0': np.int64(step0)}, note


def _supplied_mask(folder, entry, shape, downsample):
    from clusiam_jax.slides import annotations
    path = annotations.find_annotation_file(folder, entry.slide_id)
    if path is None:
        return None
    return tissue.polygon_mask(annotations.read_annotations(path), shape, downsample)


@dataclasses.dataclass(frozen=True)
class _Redo:
    """A finished slide a rerun redoes: why, and what it had."""
    why: str
    mpp: str
    origin: str
    n_patches: int


def _previous(entry: SlideEntry, params: TileParams, out_dir: str):
    """(the row of a slide already tiled with these settings (a rerun), else None;
    a _Redo when the slide has a coordinate file made with other settings, else None)."""
    path = coords_lib.trident_file(out_dir, entry.slide_id)
    if not os.path.exists(path):
        return None, None
    try:
        found = coords_lib.read_coords(path)
    except DataError:
        return None, None
    attrs = found.attrs
    mpp, origin = float(attrs['level0_mpp']), str(attrs.get('mpp_origin', ''))
    why = []
    if attrs.get('tiling_key') != tiling_key(entry, params):
        why = _changes(attrs, entry, params)
    if origin == DEFAULT_ORIGIN and mpp != params.mpp_default:
        why.append(f'its µm/px came from {DEFAULT_ORIGIN} {mpp:g}, now '
                   + (f'{params.mpp_default:g}' if params.mpp_default else 'unset'))
    if why:
        return None, _Redo('; '.join(why), f'{mpp:.6g}', origin, len(found.coords))
    return _row(entry, TILED, str(attrs.get('tiling_note', '')), mpp, origin,
                len(found.coords), attrs.get('tissue_fraction')), None


def _flat_settings(settings: dict) -> dict:
    """tile.<key> -> value of _key_inputs' settings (today's key names)."""
    flat = {'align': False}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat['mpp_override' if key == 'mpp' else key] = value
    return flat


def _shown(value) -> str:
    if isinstance(value, float):
        return f'{value:g}'
    return repr(value) if isinstance(value, str) else str(value)


def _changes(attrs: dict, entry: SlideEntry, params: TileParams) -> List[str]:
    """What differs between the tiling of a coordinate file (its attributes) and this
    one, in words; a file from before `tiling_inputs` was recorded says less."""
    new = json.loads(json.dumps(_key_inputs(entry, params), default=str))
    try:
        old = json.loads(attrs['tiling_inputs'])
    except (KeyError, TypeError, ValueError):
        old = None
    out = []
    if old is None:
        for key in ('target_mpp', 'patch_size', 'overlap'):
            before, now = attrs.get(key), getattr(params, key)
            if before is not None and before != now:
                out.append(f'tile.{key} {_shown(before)} -> {_shown(now)}')
        if os.path.abspath(entry.path) != attrs.get('slide_path'):
            out.append(f'the slide file is now {entry.path} (was {attrs.get("slide_path")})')
        return out or ['other settings or a changed slide file (the coordinate file does '
                       'not record which)']
    if old.get('file') != new['file']:
        before = (old.get('file') or [None])[0]
        out.append('the slide file changed (size or modification time)'
                   if before == new['file'][0] else
                   f'the slide file is now {entry.path} (was {before})')
    if old.get('mask') != new['mask']:
        out.append('its tile.masks file changed')
    if old.get('mpp_column') != new['mpp_column']:
        out.append(f'its "mpp" column {_shown(old.get("mpp_column"))} -> '
                   f'{_shown(new["mpp_column"])}')
    before, now = _flat_settings(old.get('settings', {})), _flat_settings(new['settings'])
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            out.append(f'tile.{key} {_shown(before.get(key))} -> {_shown(now.get(key))}')
    return out or ['the tiling key changed']


# --------------------------------------------------------------------- the job

def read_slides_csv(out_dir: str) -> List[dict]:
    path = os.path.join(out_dir, SLIDES_CSV)
    with open(path, newline='', encoding='utf-8-sig') as f:
        return list(csv.DictReader(f))


def _rows_on_disk(out_dir: str) -> List[dict]:
    """The rows slides.csv has now ([] when there is none): those of earlier jobs, and of
    any job writing into the folder meanwhile."""
    path = os.path.join(out_dir, SLIDES_CSV)
    if not os.path.isfile(path):
        return []
    try:
        rows = read_slides_csv(out_dir)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f'cannot read {path} ({e}): it lists the slides tiled there; '
                        f'move it away to start the list anew') from None
    return [{k: r.get(k) or '' for k in SLIDES_FIELDS} for r in rows]


def _merged_rows(out_dir: str, finished: Dict[str, List[dict]],
                 order: List[str]) -> List[dict]:
    """slides.csv to write: the rows on disk, read again now, with this job's finished
    rows in place of theirs and new slides after them. Rows of slides this job has not
    finished (yet) are kept: their coordinate files are still there and trained on, and
    another job tiling into the folder may have written them since this one started.
    `finished`: slide id -> its rows (several for slides sharing an id, all
    `duplicate_id`); on disk, an id has one row, or several `duplicate_id` ones."""
    rows, seen, on_disk = [], set(), {}
    for row in _rows_on_disk(out_dir):
        on_disk.setdefault(row['slide_id'], []).append(row)
    for slide_id, found in on_disk.items():
        seen.add(slide_id)
        if slide_id in finished:
            rows.extend(finished[slide_id])
        elif all(r['status'] == DUPLICATE_ID for r in found):
            rows.extend({r['path']: r for r in found}.values())
        else:
            rows.append(found[0])
    return rows + [r for s in order if s in finished and s not in seen for r in finished[s]]


def _write_slides_csv(out_dir: str, finished: Dict[str, List[dict]], order: List[str]):
    path = os.path.join(out_dir, SLIDES_CSV)
    rows = _merged_rows(out_dir, finished, order)
    with _writing(path), atomic_write(path) as tmp, \
            open(tmp, 'w', newline='', encoding='utf-8') as f:
        writer = csv.DictWriter(f, fieldnames=SLIDES_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def _clear_stale(out_dir: str, entry: SlideEntry):
    """A slide redone (changed config or file) must not keep an old coordinate file if
    it now fails or has no tissue."""
    if coords_lib.id_problem(entry.slide_id) is not None:
        return   # no file of this slide was ever written: its id names none
    path = coords_lib.trident_file(out_dir, entry.slide_id)
    if os.path.exists(path):
        with _writing(path):
            os.remove(path)


def tile_slides(entries: List[SlideEntry], params: TileParams, out_dir: str,
                num_workers: int = 0) -> List[dict]:
    """Tiles every slide (reusing finished ones); writes slides.csv as slides finish.
    DataError when no slide could be tiled; OutputError when the output cannot be
    written (the job stops, the slides finished so far are kept)."""
    with _writing(out_dir):
        os.makedirs(os.path.join(out_dir, coords_lib.PATCHES_DIR), exist_ok=True)
    order = list(dict.fromkeys(e.slide_id for e in entries))   # slides sharing an id: one
    kept = {r['slide_id'] for r in _rows_on_disk(out_dir)} - set(order)
    if kept:
        log.info('tile: %d slides of an earlier run into %s are kept in its slides.csv',
                 len(kept), out_dir)
    if params.mpp_override:
        log.info("tile: %s forces level-0 µm/px %g on every slide (but those a slide CSV's "
                 '"mpp" column gives); each slide whose metadata says otherwise is logged',
                 OVERRIDE_ORIGIN, params.mpp_override)
    rows: Dict[str, List[dict]] = {}   # slide id -> its row (rows, for an id shared)
    todo, redo = [], {}
    duplicates = _duplicate_rows(entries)
    for i, entry in enumerate(entries):
        row = _bad_id_row(entry) or duplicates.get(i)
        if row is not None:
            log.warning('tile: %s %s: %s', entry.path if i in duplicates else entry.slide_id,
                        row['status'], row['reason'])
            if row['status'] == DUPLICATE_ID and entry.slide_id not in rows:
                _clear_stale(out_dir, entry)   # which slide it was is no longer known
            rows.setdefault(entry.slide_id, []).append(row)
            continue
        row, previous = _previous(entry, params, out_dir)
        if row is not None:
            rows[entry.slide_id] = [row]
            continue
        todo.append(entry)
        if previous is not None:
            redo[entry.slide_id] = previous
            log.info('tile: redoing %s (tiled before at level-0 µm/px %s, %s; %d patches): '
                     '%s', entry.slide_id, previous.mpp, previous.origin or 'origin unknown',
                     previous.n_patches, previous.why)
    reused = [r for group in rows.values() for r in group if r['status'] == TILED]
    if reused:
        log.info('tile: %d of %d slides already tiled with these settings; reusing them',
                 len(reused), len(entries))
    overridden = sum(r['reason'].startswith(OVERRIDE_ORIGIN) for r in reused)
    if overridden:
        log.warning('tile: %d of the reused slides have the µm/px of their metadata replaced '
                    'by %s (their reason in %s)', overridden, OVERRIDE_ORIGIN, SLIDES_CSV)
    if redo:
        log.info('tile: %d slides tiled before with other settings or files are redone',
                 len(redo))

    bar = tqdm.tqdm(total=len(entries), initial=sum(len(g) for g in rows.values()),
                    unit='slide', desc='tile', dynamic_ncols=True)
    last_write = 0.0

    def done(entry, row):
        nonlocal last_write
        if row['status'] != TILED:
            _clear_stale(out_dir, entry)
            log.warning('tile: %s %s: %s', entry.slide_id, row['status'], row['reason'])
        elif row['reason'].startswith((OVERRIDE_ORIGIN, DEFAULT_ORIGIN)):
            log.warning('tile: %s: %s', entry.slide_id, row['reason'])
        before = redo.get(entry.slide_id)
        if before is not None and row['level0_mpp'] and row['level0_mpp'] != before.mpp:
            log.info('tile: %s redone at level-0 µm/px %s (%s), was %s (%s): %s patches, '
                     'were %d', entry.slide_id, row['level0_mpp'], row['mpp_origin'],
                     before.mpp, before.origin or 'origin unknown', row['n_patches'],
                     before.n_patches)
        rows[entry.slide_id] = [row]
        bar.update(1)
        if time.monotonic() - last_write > 2.0:
            _write_slides_csv(out_dir, rows, order)
            last_write = time.monotonic()

    try:
        if num_workers > 0 and len(todo) > 1:
            ctx = multiprocessing.get_context('spawn')
            with concurrent.futures.ProcessPoolExecutor(
                    min(num_workers, len(todo)), mp_context=ctx,
                    initializer=interrupts.worker_initializer()) as pool:
                futures = {pool.submit(tile_slide, e, params, out_dir): e for e in todo}
                try:
                    for fut in concurrent.futures.as_completed(futures):
                        interrupts.check()
                        done(futures[fut], fut.result())
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
        else:
            for entry in todo:
                interrupts.check()
                done(entry, tile_slide(entry, params, out_dir))
    except BaseException:
        bar.close()
        try:   # what is finished is kept on Ctrl-C or a full disk
            _write_slides_csv(out_dir, rows, order)
        except DataError as e:   # the disk is still full: the first error is the one told
            log.warning('tile: %s', e)
        raise
    bar.close()
    _write_slides_csv(out_dir, rows, order)
    final = [r for s in order for r in rows[s]]
    n_ok = sum(r['status'] == TILED for r in final)
    n_patches = sum(int(r['n_patches']) for r in final if r['status'] == TILED)
    log.info('tile: %d of %d slides tiled, %d patches -> %s (%s)', n_ok, len(final),
             n_patches, out_dir, os.path.join(out_dir, SLIDES_CSV))
    if not n_ok:
        raise DataError(f'no slide could be tiled; the reasons are in '
                        f'{os.path.join(out_dir, SLIDES_CSV)}')
    return final
