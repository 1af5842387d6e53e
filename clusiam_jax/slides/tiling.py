r"""`--mode tile`: a folder (or CSV) of slides -> per-slide patch coordinates.

  python launch.py --mode tile --config configs/<recipe>.py \
      --config.tile.slides=DIR_OR_CSV --config.tile.out_dir=DIR

For each slide (docs/formats.md, "Tiling output"):
  <out_dir>/patches/<slide_id>_patches.h5   coords at level 0 + TRIDENT's attributes
  <out_dir>/masks/<slide_id>.png            QC: thumbnail, tissue contour, kept grid
  <out_dir>/slides.csv                      one row per slide: resolution and its origin,
                                            patch count, tissue fraction, status, reason

The grid: patches of `tile.patch_size` px at `tile.target_mpp` µm/px, i.e.
round(patch_size * target_mpp / level0_mpp) level-0 px, stepped by (patch_size - overlap)
at the same scale from the slide's top-left corner, whole patches only, row by row
(`tile.align`: on the scanner's tiles instead, slides/aligned_grid.py). A patch is
kept when at least `tile.min_tissue` of it is tissue (tissue.py, or the polygons of
`tile.masks`). Everything is a function of the slide and the config, so the
coordinates are the same on every rerun.

Slides are tiled by a process pool; a slide that cannot be read, has no resolution or
no tissue, an id that is no file name (every file of a slide is named by its id, inside
`out_dir`: slides/coords.py) or a size whose thumbnail would take minutes to decode is a
row with its status and reason, never the end of the job. Failing to write the output
(a full disk) is the job's error, not the slide's: the job stops, its finished slides
kept. A rerun reuses every slide whose file carries the same `tiling_key` (config + file
size and modification time) and redoes the others; slides.csv is read again before
each write, so the rows of slides this job does not (yet) redo stay as they are.
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
from typing import Dict, List, Optional

import cv2
import numpy as np
import tqdm

from clusiam_jax import interrupts
from clusiam_jax.atomic import atomic_write
from clusiam_jax.errors import ConfigError, DataError
from clusiam_jax.slides import aligned_grid, reader, tiles, tissue
from clusiam_jax.slides import coords as coords_lib

log = logging.getLogger('clusiam_jax')

SLIDES_CSV = 'slides.csv'
MASKS_DIR = 'masks'
SLIDES_FIELDS = ('slide_id', 'path', 'label', 'level0_mpp', 'mpp_origin', 'n_patches',
                 'tissue_fraction', 'status', 'reason')
# status values of slides.csv
TILED, NO_TISSUE, NO_MPP, UNREADABLE = 'tiled', 'no_tissue', 'no_mpp', 'unreadable'
BAD_ID, TOO_LARGE = 'bad_id', 'too_large'
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
    mpp: float                    # 0: from the slide
    masks: str                    # '' : detect tissue
    detection: tissue.TissueParams
    align: bool = False           # patches laid on the scanner's tiles (aligned_grid.py)

    @classmethod
    def from_config(cls, tile):
        return cls(float(tile.target_mpp), int(tile.patch_size), int(tile.overlap),
                   float(tile.min_tissue), float(tile.mpp or 0), str(tile.masks or ''),
                   tissue.TissueParams.from_config(tile), bool(tile.align))


# ------------------------------------------------------------------- the slide list

def _find_slides(folder: str) -> List[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
        for name in filenames:
            if name.lower().endswith(reader.SLIDE_EXTENSIONS) and not name.startswith('.'):
                found.append(os.path.join(dirpath, name))
    return sorted(found)


def _read_slide_csv(path: str) -> List[SlideEntry]:
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline='', encoding='utf-8-sig') as f:   # Excel writes a BOM
        rows = csv.DictReader(f)
        columns = [c.strip() for c in (rows.fieldnames or [])]
        if 'path' not in columns:
            raise DataError(f'{path} has no "path" column (columns: {columns}); expected '
                            f'path[,slide_id][,mpp][,label]')
        rows.fieldnames = columns
        entries = []
        for line, row in enumerate(rows, start=2):
            raw = (row.get('path') or '').strip()
            if not raw:
                raise DataError(f'{path}:{line}: empty "path"')
            slide_path = raw if os.path.isabs(raw) else os.path.join(base, raw)
            slide_path = os.path.abspath(slide_path)
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


def list_slides(slides: str) -> List[SlideEntry]:
    """The slides of `tile.slides`: a folder searched recursively, a CSV, or one slide."""
    if not slides:
        raise ConfigError('tile.slides is empty: give a folder of slides or a CSV with a '
                          '"path" column (--config.tile.slides=...)')
    if not os.path.exists(slides):
        raise DataError(f'tile.slides not found: {slides}')
    slides = os.path.abspath(slides)   # slides.csv records where the slides are, for good
    if os.path.isfile(slides):
        if slides.lower().endswith(reader.SLIDE_EXTENSIONS):
            entries = [SlideEntry(reader.slide_id_of(slides), slides)]
        elif not slides.lower().endswith('.csv'):
            raise DataError(f'tile.slides {slides} is neither a slide file '
                            f'({", ".join(reader.SLIDE_EXTENSIONS)}) nor a CSV of slides')
        else:
            entries = _read_slide_csv(slides)
    else:
        entries = [SlideEntry(reader.slide_id_of(p), p) for p in _find_slides(slides)]
        if not entries:
            raise DataError(f'no slide files ({", ".join(reader.SLIDE_EXTENSIONS)}) under '
                            f'{slides}')
    if not entries:
        raise DataError(f'{slides} lists no slides')
    seen: Dict[str, str] = {}
    for e in entries:
        if e.slide_id in seen:
            raise DataError(f'two slides share the id {e.slide_id!r}: {seen[e.slide_id]} and '
                            f'{e.path} (give a CSV with a slide_id column)')
        seen[e.slide_id] = e.path
    return entries


# -------------------------------------------------------------------- one slide

def _file_identity(path: Optional[str]):
    if not path:
        return None
    try:
        st = os.stat(path)
        return [os.path.abspath(path), st.st_size, int(st.st_mtime)]
    except OSError:
        return [os.path.abspath(path), None, None]


def tiling_key(entry: SlideEntry, params: TileParams) -> str:
    """Config + the slide file's identity (+ its mask file's): a rerun reuses a slide's
    coordinates only when equal."""
    mask = None
    if params.masks:
        from clusiam_jax.slides import annotations
        mask = _file_identity(annotations.find_annotation_file(params.masks, entry.slide_id))
    settings = dataclasses.asdict(params)
    if not settings['align']:   # tilings made before the option keep their key
        del settings['align']
    payload = json.dumps([_file_identity(entry.path), mask, entry.mpp, settings],
                         sort_keys=True, default=str)
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


def _resolution(slide, entry: SlideEntry, params: TileParams) -> reader.Resolution:
    if entry.mpp:
        return reader.Resolution(entry.mpp, 'the slide list\'s mpp column')
    return reader.level0_resolution(slide, params.mpp or None)


def _qc_picture(thumb, mask_small, coords, size0, downsample, title) -> np.ndarray:
    """Thumbnail, tissue contour (green) and kept patches (blue squares)."""
    image = thumb.copy()
    h, w = image.shape[:2]
    contour_mask = cv2.resize(mask_small.astype(np.uint8), (w, h),
                              interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(contour_mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    thick = max(1, round(max(h, w) / 600))
    cv2.drawContours(image, contours, -1, (0, 170, 0), thick, cv2.LINE_AA)
    for x, y in coords:
        p0 = (int(x / downsample), int(y / downsample))
        p1 = (int((x + size0) / downsample) - 1, int((y + size0) / downsample) - 1)
        cv2.rectangle(image, p0, p1, (30, 60, 220), 1)
    # The title on a white band, as large as fits the width (between 0.35 and 0.8).
    font = cv2.FONT_HERSHEY_SIMPLEX
    (text_w, text_h), _ = cv2.getTextSize(title, font, 1.0, 1)
    scale = min(0.8, max(0.35, (w - 8) / text_w))
    band = np.full((int(text_h * scale * 1.8) + 6, w, 3), 255, np.uint8)
    cv2.putText(band, title, (4, band.shape[0] - 6), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([band, image], axis=0)


def _bad_id_row(entry: SlideEntry) -> Optional[dict]:
    """The row of a slide whose id cannot name its files, else None."""
    problem = coords_lib.id_problem(entry.slide_id)
    if problem is None:
        return None
    return _row(entry, BAD_ID, f'slide id {entry.slide_id!r} {problem}: it names the slide\'s '
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
        return _row(entry, UNREADABLE, f'{type(e).__name__}: {" ".join(str(e).split())}')
    finally:
        slide.close()


def _tile_open_slide(slide, direct, entry, params, out_dir) -> dict:
    """`direct`: the slide's slides.tiles.TiffTiles (or None), for its hidden levels."""
    res = _resolution(slide, entry, params)
    if res.mpp is None:
        return _row(entry, NO_MPP, f'{res.origin}: set its µm/px with --config.tile.mpp=... '
                    f'or an "mpp" column in a slide CSV (tile.slides=slides.csv)')
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
    candidates, grid_attrs, note = _candidates(slide, direct, entry, params, size0, step0)
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
             'tissue_fraction': float(mask.mean()), 'tiling_note': note, **grid_attrs}
    title = (f'{entry.slide_id}: {len(kept)} patches of {params.patch_size} px at '
             f'{params.target_mpp:g} um/px ({size0} px at level 0)')
    qc_thumb, qc_ds = reader.thumbnail_for_side(slide, QC_MAX_SIDE, direct)
    qc = _qc_picture(qc_thumb, mask, kept, size0, qc_ds, title)
    qc_path = coords_lib.slide_path(os.path.join(out_dir, MASKS_DIR), entry.slide_id, '.png')
    ok, encoded = cv2.imencode('.png', cv2.cvtColor(qc, cv2.COLOR_RGB2BGR))
    with _writing(qc_path):
        os.makedirs(os.path.dirname(qc_path), exist_ok=True)
        with atomic_write(qc_path) as tmp, open(tmp, 'wb') as f:
            f.write(encoded.tobytes())
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


def _reuse(entry: SlideEntry, params: TileParams, out_dir: str) -> Optional[dict]:
    """The row of a slide already tiled with this key (a rerun), else None."""
    path = coords_lib.trident_file(out_dir, entry.slide_id)
    if not os.path.exists(path):
        return None
    try:
        found = coords_lib.read_coords(path)
    except DataError:
        return None
    if found.attrs.get('tiling_key') != tiling_key(entry, params):
        return None
    return _row(entry, TILED, str(found.attrs.get('tiling_note', '')),
                float(found.attrs['level0_mpp']),
                str(found.attrs.get('mpp_origin', '')), len(found.coords),
                found.attrs.get('tissue_fraction'))


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


def _merged_rows(out_dir: str, finished: Dict[str, dict], order: List[str]) -> List[dict]:
    """slides.csv to write: the rows on disk, read again now, with this job's finished
    rows in place of theirs and new slides after them. Rows of slides this job has not
    finished (yet) are kept: their coordinate files are still there and trained on, and
    another job tiling into the folder may have written them since this one started."""
    rows, seen = [], set()
    for row in _rows_on_disk(out_dir):
        if row['slide_id'] not in seen:
            seen.add(row['slide_id'])
            rows.append(finished.get(row['slide_id'], row))
    return rows + [finished[s] for s in order if s in finished and s not in seen]


def _write_slides_csv(out_dir: str, finished: Dict[str, dict], order: List[str]):
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
    order = [e.slide_id for e in entries]
    kept = {r['slide_id'] for r in _rows_on_disk(out_dir)} - set(order)
    if kept:
        log.info('tile: %d slides of an earlier run into %s are kept in its slides.csv',
                 len(kept), out_dir)
    rows: Dict[str, dict] = {}
    todo = []
    for entry in entries:
        row = _bad_id_row(entry) or _reuse(entry, params, out_dir)
        if row is None:
            todo.append(entry)
        else:
            rows[entry.slide_id] = row
    n_reused = sum(r['status'] == TILED for r in rows.values())
    if n_reused:
        log.info('tile: %d of %d slides already tiled with these settings; reusing them',
                 n_reused, len(entries))
    for entry in entries:
        if rows.get(entry.slide_id, {}).get('status') == BAD_ID:
            log.warning('tile: %s %s: %s', entry.slide_id, BAD_ID,
                        rows[entry.slide_id]['reason'])

    bar = tqdm.tqdm(total=len(entries), initial=len(rows), unit='slide', desc='tile',
                    dynamic_ncols=True)
    last_write = 0.0

    def done(entry, row):
        nonlocal last_write
        if row['status'] != TILED:
            _clear_stale(out_dir, entry)
            log.warning('tile: %s %s: %s', entry.slide_id, row['status'], row['reason'])
        rows[entry.slide_id] = row
        bar.update(1)
        if time.monotonic() - last_write > 2.0:
            _write_slides_csv(out_dir, rows, order)
            last_write = time.monotonic()

    try:
        if num_workers > 0 and len(todo) > 1:
            ctx = multiprocessing.get_context('spawn')
            with concurrent.futures.ProcessPoolExecutor(
                    min(num_workers, len(todo)), mp_context=ctx,
                    initializer=interrupts.ignore_in_worker) as pool:
                futures = {pool.submit(tile_slide, e, params, out_dir): e for e in todo}
                try:
                    for fut in concurrent.futures.as_completed(futures):
                        done(futures[fut], fut.result())
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
        else:
            for entry in todo:
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
    final = [rows[s] for s in order]
    n_ok = sum(r['status'] == TILED for r in final)
    n_patches = sum(int(r['n_patches']) for r in final if r['status'] == TILED)
    log.info('tile: %d of %d slides tiled, %d patches -> %s (%s)', n_ok, len(final),
             n_patches, out_dir, os.path.join(out_dir, SLIDES_CSV))
    if not n_ok:
        raise DataError(f'no slide could be tiled; the reasons are in '
                        f'{os.path.join(out_dir, SLIDES_CSV)}')
    return final
