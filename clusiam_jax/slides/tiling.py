"""`--mode tile`: a folder (or CSV) of slides -> `patches/<slide_id>_patches.h5`,
`masks/<slide_id>.png` and `slides.csv` (docs/formats.md, "Tiling output"). The grid is a
function of the slide and the config, the same on every rerun; a slide that fails is a row
with its reason, never the end of the job; failing to write the output stops the job.
"""
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import time
from typing import Dict, List, Optional

import numpy as np
import tqdm

from clusiam_jax import interrupts, storage
from clusiam_jax.errors import ConfigError, DataError
from clusiam_jax.slides import aligned_grid, listing, qc, reader, retile, tissue
from clusiam_jax.slides import coords as coords_lib
from clusiam_jax.slides import slides_csv as table
from clusiam_jax.slides.listing import SlideEntry
from clusiam_jax.slides.retile import tiling_key
from clusiam_jax.slides.slides_csv import DEFAULT_ORIGIN, OVERRIDE_ORIGIN, TILED, OutputError
from clusiam_jax.slides.tissue_positions import cell_fractions, keeps_rule  # noqa: F401

log = logging.getLogger('clusiam_jax')

# Slides in a bucket that get a tile index (tile_index.py): the TIFF family.
TIFF_FAMILY = ('.svs', '.tif', '.tiff', '.ndpi', '.scn', '.bif')


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


def list_slides(slides: str) -> List[SlideEntry]:
    """The slides of `tile.slides`: a folder searched recursively, a CSV, or one slide."""
    if not slides:
        raise ConfigError('tile.slides is empty: give a folder of slides or a CSV with a '
                          '"path" column (--config.tile.slides=...)')
    if not storage.exists(slides):
        raise DataError(f'tile.slides not found: {slides}')
    # slides.csv records where the slides are, for good
    slides = storage.resolve(os.getcwd(), slides)
    if storage.isfile(slides):
        if slides.lower().endswith(reader.SLIDE_EXTENSIONS + (reader.DICOM_EXTENSION,)):
            entries = [SlideEntry(reader.slide_id_of(slides), slides)]
        elif not slides.lower().endswith('.csv'):
            raise DataError(f'tile.slides {slides} is neither a slide file '
                            f'({reader.SLIDE_FORMATS}) nor a CSV of slides')
        else:
            entries = listing.read_slide_list(slides)
    else:
        entries, skipped = listing.find_slides(slides)
        others = listing.skipped_line(skipped)
        if not entries:
            raise DataError(f'no slide files ({reader.SLIDE_FORMATS}) under {slides}'
                            + (f'; it has {others}' if others else ''))
        if others:
            log.warning('tile: skipped %s (under %s)', others, slides)
    if not entries:
        raise DataError(f'{slides} lists no slides')
    return entries   # slides sharing an id are rows of their own (tile_slides)


def _resolution(slide, entry: SlideEntry, params: TileParams):
    """(level-0 reader.Resolution, a note when tile.mpp_override contradicts the metadata),
    first found first: the CSV's mpp column, mpp_override, metadata, tile.mpp_default."""
    if entry.mpp:
        return reader.Resolution(entry.mpp, "the slide list's mpp column"), ''
    own = reader.level0_resolution(slide, default=params.mpp_default or None)
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


def _no_mpp_words(res: reader.Resolution):
    """(the row's reason, the QC picture's title) of a slide without a usable µm/px."""
    if res.implausible:
        return (f'{res.implausible}: set --config.tile.mpp_default=... (used for slides '
                f'without a usable µm/px) or the slide CSV\'s "mpp" column '
                f'(tile.slides=slides.csv)',
                f'{res.implausible}: set tile.mpp_default or the CSV mpp column')
    if res.origin == reader.NO_MPP_ORIGIN:
        return (f'{res.origin}: give it with --config.tile.mpp_default=... (used only for '
                f'slides without µm/px) or in an "mpp" column of a slide CSV '
                f'(tile.slides=slides.csv)', 'no µm/px: set tile.mpp_default or the CSV mpp column')
    return (f'{res.origin}: give its µm/px in an "mpp" column of a slide CSV '
            f'(tile.slides=slides.csv), or --config.tile.mpp_override=... when every slide '
            f'of the list has that µm/px', f'{res.origin}: set the CSV mpp column')


def _no_grid_row(slide, entry, params, out_dir, status, reason, title) -> dict:
    """The row of a slide without a usable µm/px, after its QC picture if one can be made."""
    try:
        picture = qc.no_grid_picture(slide, entry, params.detection, title)
    except Exception as e:  # a slide whose pixels do not decode: its row says what it is
        log.debug('tile: %s: no QC picture', entry.slide_id, exc_info=True)
        return table.row(entry, status, f'{reason}; no QC picture ({entry.path}: '
                         f'{type(e).__name__}: {" ".join(str(e).split())})')
    if picture is not None:
        qc.write(out_dir, entry, *picture)
    return table.row(entry, status, reason)


def _bad_id_row(entry: SlideEntry) -> Optional[dict]:
    """The row of a slide whose id cannot name its files, else None."""
    problem = coords_lib.id_problem(entry.slide_id)
    if problem is None:
        return None
    return table.row(entry, table.BAD_ID, f"slide id {entry.slide_id!r} {problem}: it names "
                     f"the slide's files, so give it a plain file name (the slide_id column "
                     f'of the slide CSV)')


def tile_slide(entry: SlideEntry, params: TileParams, out_dir: str) -> dict:
    """Tiles one slide; returns its slides.csv row (never raises for a bad slide; raises
    OutputError when its output cannot be written)."""
    bad = _bad_id_row(entry)
    if bad is not None:
        return bad
    if not storage.is_url(entry.path):
        return _tile_file(entry, entry.path, params, out_dir)
    if entry.path.lower().endswith(listing.UNSTAGED):
        return table.row(entry, table.UNREADABLE, f'{entry.path}: a VMS/VMU slide (files named '
                         f'inside it) is tiled from local disk only: copy it out of the bucket '
                         f'and list the copy')
    with contextlib.ExitStack() as stack:   # staged whole, one slide at a time per worker
        try:   # the ETag first: a write during the download then fails the index's check
            etag = storage.version(entry.path)[1]
            local = stack.enter_context(listing.staged(entry.path))
        except DataError as e:
            return table.row(entry, table.UNREADABLE, str(e))
        return _tile_file(entry, local, params, out_dir, etag)


def _tile_file(entry: SlideEntry, local: str, params: TileParams, out_dir: str,
               etag: str = '') -> dict:
    """tile_slide of the slide file at `local` (entry.path, or its staged copy)."""
    try:
        slide = reader.open_slide(local)
    except DataError as e:
        return table.row(entry, table.UNREADABLE, str(e).replace(local, entry.path))
    with slide:
        try:
            return _tile_open_slide(slide, entry, params, out_dir,
                                    local if storage.is_url(entry.path) else None, etag)
        except OutputError:
            raise
        except reader.SlideTooLarge as e:
            return table.row(entry, table.TOO_LARGE, e.problem)
        except Exception as e:  # a truncated file fails while reading its pixels; any
            # failure of one slide is that slide's row, never the end of the job
            log.debug('tile: %s failed', entry.slide_id, exc_info=True)
            return table.row(entry, table.UNREADABLE, f'{entry.path}: {type(e).__name__}: '
                             f'{" ".join(str(e).split())}')


def _tile_open_slide(slide, entry, params, out_dir, staged: Optional[str] = None,
                     etag: str = '') -> dict:
    res, mpp_note = _resolution(slide, entry, params)
    if res.mpp is None:
        status = table.BAD_MPP if res.implausible else table.NO_MPP
        return _no_grid_row(slide, entry, params, out_dir, status, *_no_mpp_words(res))
    if res.origin.startswith('estimated'):
        log.warning('%s: level-0 µm/px %s (%s)', entry.slide_id, f'{res.mpp:.4g}', res.origin)
    width, height = slide.dimensions
    size0 = int(round(params.patch_size * params.target_mpp / res.mpp))
    step0 = int(round((params.patch_size - params.overlap) * params.target_mpp / res.mpp))
    if size0 < 1 or step0 < 1:
        return table.row(entry, table.NO_MPP,
                         f'level-0 µm/px {res.mpp} makes a patch of {size0} px')
    # The detection image, never finer than level 0.
    ds = max(1.0, params.detection.tissue_mpp / res.mpp)
    too_large = reader.thumbnail_problem(slide, ds)
    if too_large is not None:
        return table.row(entry, table.TOO_LARGE, too_large, res.mpp, res.origin)
    small, ds = reader.thumbnail(slide, ds)
    if params.masks:
        from clusiam_jax.slides import annotations
        found = annotations.find_annotation_file(params.masks, entry.slide_id)
        if found is None:
            return table.row(entry, table.NO_TISSUE, f'no annotation file for '
                             f'{entry.slide_id} in tile.masks {params.masks}', res.mpp,
                             res.origin)
        mask = tissue.polygon_mask(annotations.read_annotations(found), small.shape[:2], ds)
    else:
        mask = tissue.tissue_mask(small, res.mpp * ds, params.detection)
    candidates, grid_attrs, align_note = _candidates(slide, entry, params, size0, step0)
    note = '; '.join(n for n in (mpp_note, align_note) if n)
    # The rule (tissue_positions owns it: fresh positions of tissue_random keep it too).
    kept = candidates[keeps_rule(mask, candidates, size0, ds, params.min_tissue)]
    tissue_fraction = float(mask.mean())
    attrs = {'patch_size': params.patch_size, 'patch_size_level0': size0,
             'level0_magnification': 10.0 / res.mpp,
             'target_magnification': 10.0 / params.target_mpp,
             'overlap': params.overlap, 'level0_width': width, 'level0_height': height,
             'name': entry.slide_id, 'target_mpp': params.target_mpp,
             'level0_mpp': res.mpp, 'mpp_origin': res.origin, 'slide_path':
             storage.resolve(os.getcwd(), entry.path), 'tiling_key': tiling_key(entry, params),
             'tiling_inputs': json.dumps(retile.key_inputs(entry, params), sort_keys=True,
                                         default=str),
             'tissue_fraction': tissue_fraction, 'tiling_note': note, **grid_attrs}
    lines = [f'{entry.slide_id}: {len(kept)} patches kept',
             f'patch tile.patch_size {params.patch_size} px at tile.target_mpp '
             f'{params.target_mpp:g} µm/px = {params.patch_size * params.target_mpp:g} µm '
             f'({size0} px at level 0); tile.overlap {params.overlap}; tile.min_tissue '
             f'{params.min_tissue:g}',
             f'level-0 µm/px {res.mpp:.4g} ({res.origin}); green: tissue, blue: kept patches']
    qc_thumb, qc_ds = reader.thumbnail_for_side(slide, qc.QC_MAX_SIDE)
    picture = qc.picture(qc_thumb, mask, kept, size0, qc_ds, lines, res.mpp * qc_ds)
    qc_path = qc.write(out_dir, entry, picture, lines)
    if not len(kept):
        return table.row(entry, table.NO_TISSUE, f'no patch with tissue >= tile.min_tissue '
                         f'{params.min_tissue:g} (tissue {tissue_fraction:.1%} of the slide; '
                         f'see {qc_path})', res.mpp, res.origin, 0, tissue_fraction)
    if staged is not None and entry.path.lower().endswith(TIFF_FAMILY):
        _write_tile_index(staged, entry, out_dir, etag)   # before the coordinates a rerun reuses
    coords_path = coords_lib.trident_file(out_dir, entry.slide_id)
    with table.writing(coords_path):
        # The mask the patches were kept by (the polygons', with tile.masks): fresh
        # positions (data.sampling=tissue_random) are drawn from it by the same rule.
        coords_lib.write_trident(coords_path, kept, attrs, coords_lib.TissueMask(
            mask, ds, params.min_tissue, (width, height)))
    return table.row(entry, TILED, note, res.mpp, res.origin, len(kept), tissue_fraction)


def _write_tile_index(staged: str, entry: SlideEntry, out_dir: str, etag: str = ''):
    """`tile_index/<id>.npz`: tiles fetched by byte range, no header parsed over the network."""
    from clusiam_jax.slides import tile_index
    try:
        index = tile_index.build_for_slide(staged, name=entry.path, etag=etag)
    except tile_index.Unindexable as e:
        log.info('tile: %s: no tile index (%s); reading it from the bucket stages it whole',
                 entry.slide_id, e)
        return
    path = tile_index.index_file(out_dir, entry.slide_id)
    with table.writing(path):
        tile_index.write(path, index)


def _candidates(slide, entry, params, size0, step0):
    """(every patch corner before the tissue test, row by row; the coordinate file's
    attributes that say which grid; why tile.align did not apply or '')."""
    note, attrs = '', {'step_level0': np.int64(step0)}
    xs, ys = (np.arange(0, side - size0 + 1, step0, dtype=np.int64) for side in slide.dimensions)
    if params.align:
        aligned = aligned_grid.aligned_grid(slide, size0, params.patch_size)
        if isinstance(aligned, str):   # the reason
            note = f'tile.align: {aligned}; tiled on the regular grid'
            log.warning('%s: %s', entry.slide_id, note)
        else:
            xs, ys = aligned.xs, aligned.ys
            attrs = {'aligned_to_tiles': np.array([*aligned.tile, aligned.level], np.int64)}
    yy, xx = np.meshgrid(ys, xs, indexing='ij')
    return np.stack([xx.ravel(), yy.ravel()], axis=1), attrs, note


def _clear_stale(out_dir: str, entry: SlideEntry):
    """A slide redone must not keep an old coordinate file if it now fails or has no tissue."""
    if coords_lib.id_problem(entry.slide_id) is not None:
        return   # no file of this slide was ever written: its id names none
    path = coords_lib.trident_file(out_dir, entry.slide_id)
    with table.writing(path):
        if storage.exists(path):
            storage.remove(path)


def host_shares(slide_ids: List[str], host_count: int) -> List[set]:
    """Each host's slide ids: the sorted ids at h, h + count, ... (alike on every host, rerun)."""
    ordered = sorted(set(slide_ids))
    return [set(ordered[h::host_count]) for h in range(host_count)]


def tile_slides(entries: List[SlideEntry], params: TileParams, out_dir: str,
                num_workers: int = 0, host_index: int = 0, host_count: int = 1) -> List[dict]:
    """Tiles every slide (reusing finished ones) or, over `host_count` hosts, this host's
    share; writes slides.csv (a host its own part, merged by the last to finish) as slides
    finish. DataError when no slide could be tiled; OutputError when the output cannot be
    written (the job stops, the slides finished so far are kept)."""
    with table.writing(out_dir):
        storage.makedirs(storage.join(out_dir, coords_lib.PATCHES_DIR))
    order = list(dict.fromkeys(e.slide_id for e in entries))   # slides sharing an id: one
    kept = {r['slide_id'] for r in table.current_rows(out_dir)} - set(order)
    if kept:
        log.info('tile: %d slides of an earlier run into %s are kept in its slides.csv',
                 len(kept), out_dir)
    where = storage.join(out_dir, table.SLIDES_CSV)
    if host_count == 1:
        final = _tile_share(entries, params, out_dir, num_workers, table.SLIDES_CSV)
    else:
        shares = host_shares(order, host_count)
        part = table.part_name(host_index, host_count)
        log.info('tile: host %d of %d tiles %d of the %d slides (by sorted slide id); its rows '
                 'go to %s, merged into %s by the last host to finish', host_index, host_count,
                 len(shares[host_index]), len(order), part, table.SLIDES_CSV)
        # The part holds this run's rows only: it lists the whole share once this run is done.
        with table.writing(storage.join(out_dir, part)):
            storage.remove(storage.join(out_dir, part))
        mine = _tile_share([e for e in entries if e.slide_id in shares[host_index]], params,
                           out_dir, num_workers, part)
        final = table.merge_parts(out_dir, order, shares)
        if final is None:
            log.info('tile: host %d: %d of %d slides tiled; %s is written by the last host '
                     'to finish (or any rerun)', host_index,
                     sum(r['status'] == TILED for r in mine), len(mine), where)
            return mine
    n_ok = sum(r['status'] == TILED for r in final)
    n_patches = sum(int(r['n_patches']) for r in final if r['status'] == TILED)
    log.info('tile: %d of %d slides tiled, %d patches -> %s (%s)', n_ok, len(final),
             n_patches, out_dir, where)
    if not n_ok:
        raise DataError(f'no slide could be tiled; the reasons are in {where}')
    return final


def _tile_share(entries: List[SlideEntry], params: TileParams, out_dir: str,
                num_workers: int, csv_name: str) -> List[dict]:
    """Tiles `entries`, rewriting their rows of `csv_name` as slides finish."""
    order = list(dict.fromkeys(e.slide_id for e in entries))
    if params.mpp_override:
        log.info("tile: %s forces level-0 µm/px %g on every slide (but those a slide CSV's "
                 '"mpp" column gives); each slide whose metadata says otherwise is logged',
                 OVERRIDE_ORIGIN, params.mpp_override)
    rows: Dict[str, List[dict]] = {}   # slide id -> its row (rows, for an id shared)
    todo, redo = [], {}
    duplicates = listing.duplicate_rows(entries)
    for i, entry in enumerate(entries):
        row = _bad_id_row(entry) or duplicates.get(i)
        if row is not None:
            log.warning('tile: %s %s: %s', entry.path if i in duplicates else entry.slide_id,
                        row['status'], row['reason'])
            if row['status'] == table.DUPLICATE_ID and entry.slide_id not in rows:
                _clear_stale(out_dir, entry)   # which slide it was is no longer known
            rows.setdefault(entry.slide_id, []).append(row)
            continue
        row, previous = retile.previous(entry, params, out_dir)
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
                    'by %s (their reason in %s)', overridden, OVERRIDE_ORIGIN,
                    table.SLIDES_CSV)
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
            table.write(out_dir, rows, order, csv_name)
            last_write = time.monotonic()

    try:
        if num_workers > 0 and len(todo) > 1:
            with concurrent.futures.ProcessPoolExecutor(
                    min(num_workers, len(todo)), mp_context=multiprocessing.get_context('spawn'),
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
        try:   # what is finished is kept on Ctrl-C or a full disk
            table.write(out_dir, rows, order, csv_name)
        except DataError as e:   # the disk is still full: the first error is the one told
            log.warning('tile: %s', e)
        raise
    finally:
        bar.close()
    table.write(out_dir, rows, order, csv_name)
    return [r for s in order for r in rows[s]]
