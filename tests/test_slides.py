"""Whole slides: resolution, tissue detection, tiling, coordinate files, and the slide
source the pipeline and the export read patches through.

Synthetic slides are tiled pyramidal TIFFs written here (tests/helpers.write_pyramid:
known µm/px, stained discs at known places); the real ones are the shared CC0 region and
the TCGA slide without µm/px. OpenSlide's own read of a region is the reference for
every patch the source returns.
"""
import csv
import os
import shutil
import signal

import h5py
import numpy as np
import openslide
import pytest

from clusiam_jax import cli, data
from clusiam_jax.config import default_config
from clusiam_jax.data import epoch_plan, image_io
from clusiam_jax.data import sources as sources_lib
from clusiam_jax.errors import DataError
from clusiam_jax.slides import coords as coords_lib
from clusiam_jax.slides import reader, slides_csv, tiling, tissue
from tests.helpers import (
    MEAN,
    REPO,
    STD,
    data_config,
    synthetic_tissue,
    take,
    write_ome_pyramid,
    write_pyramid,
)

SLIDES = os.path.join(REPO, '..', 'shared', 'data', 'slides')
CMU = os.path.join(SLIDES, 'cmu-1-small-region.svs')
TCGA = os.path.join(SLIDES, 'tcga-cr-7395-01a-01-ts1.svs')
needs_shared = pytest.mark.skipif(not os.path.isfile(CMU),
                                  reason='../shared/data/slides is absent')

# A 512 x 384 µm field with three discs (centre x, centre y, radius in µm).
FIELD_UM = (512, 384)
BLOBS_UM = [(130, 120, 90), (360, 230, 110), (450, 60, 30)]


def synthetic_base(mpp=0.25):
    w, h = int(FIELD_UM[0] / mpp), int(FIELD_UM[1] / mpp)
    return synthetic_tissue(h, w, [(x / mpp, y / mpp, r / mpp) for x, y, r in BLOBS_UM])


def downscale(rgb, factor):
    import cv2
    return cv2.resize(rgb, (rgb.shape[1] // factor, rgb.shape[0] // factor),
                      interpolation=cv2.INTER_AREA)


@pytest.fixture(scope='module')
def scans(tmp_path_factory):
    """One field scanned at 0.25 (40x), 0.5 (20x) and 1.0 µm/px (10x)."""
    root = tmp_path_factory.mktemp('scans')
    base = synthetic_base(0.25)
    paths = {}
    for mpp, factor in ((0.25, 1), (0.5, 2), (1.0, 4)):
        rgb = base if factor == 1 else downscale(base, factor)
        paths[mpp] = write_pyramid(str(root / f'field_{mpp}.tif'), rgb, mpp)
    return paths


def tile_params(**overrides):
    c = default_config().tile
    c.patch_size, c.target_mpp, c.tissue_mpp, c.min_area_um2 = 64, 0.5, 2.0, 1000.0
    for key, value in overrides.items():
        c[key] = value
    return tiling.TileParams.from_config(c)


def tile_one(path, out_dir, **overrides):
    entry = tiling.SlideEntry(reader.slide_id_of(path), path)
    return tiling.tile_slide(entry, tile_params(**overrides), str(out_dir))


# ------------------------------------------------------------------ resolution

def test_resolution_comes_from_the_tiff_tags_and_is_never_guessed(scans):
    with reader.open_slide(scans[0.25]) as slide:
        assert reader.level0_resolution(slide).mpp == pytest.approx(0.25)
        assert reader.level0_resolution(slide, 0.3).mpp == pytest.approx(0.25)   # a default


@needs_shared
def test_shared_slides_resolution():
    with reader.open_slide(CMU) as slide:
        assert reader.level0_resolution(slide).mpp == pytest.approx(0.499)
    with reader.open_slide(TCGA) as slide:
        res = reader.level0_resolution(slide)
        assert res.mpp is None and 'no µm/px' in res.origin


def test_best_level_is_the_coarsest_not_coarser_than_the_target(scans):
    with reader.open_slide(scans[0.25]) as slide:
        assert [lv.downsample for lv in slide.levels[:3]] == [1.0, 2.0, 4.0]
        assert slide.best_level(1.0) == 0
        assert slide.best_level(2.0) == 1
        assert slide.best_level(3.9) == 1
        assert slide.best_level(4.02) == 2   # within 1% of a level: that level


# ------------------------------------------------------------------ tiling

def test_kept_patches_cover_the_tissue_discs(scans, tmp_path):
    row = tile_one(scans[0.5], tmp_path)
    assert row['status'] == tiling.TILED and int(row['n_patches']) > 0
    found = coords_lib.read_coords(coords_lib.trident_file(str(tmp_path), 'field_0.5'))
    size0 = int(found.attrs['patch_size_level0'])
    assert size0 == 64 and found.attrs['level0_mpp'] == pytest.approx(0.5)
    # IoU of the kept grid with the drawn discs, at level 0 of the 0.5 µm/px scan.
    w, h = int(FIELD_UM[0] / 0.5), int(FIELD_UM[1] / 0.5)
    grid = np.zeros((h, w), bool)
    for x, y in found.coords:
        grid[y:y + size0, x:x + size0] = True
    yy, xx = np.mgrid[:h, :w]
    discs = np.zeros((h, w), bool)
    for cx, cy, r in BLOBS_UM:
        discs |= (xx - cx / 0.5) ** 2 + (yy - cy / 0.5) ** 2 <= (r / 0.5) ** 2
    iou = (grid & discs).sum() / (grid | discs).sum()
    assert iou > 0.7, iou
    # Every kept patch is at least half tissue (min_tissue 0.5), measured on the discs.
    for x, y in found.coords:
        assert discs[y:y + size0, x:x + size0].mean() >= 0.4
    # The TRIDENT attributes, and the QC picture.
    for key in ('patch_size', 'patch_size_level0', 'level0_magnification',
                'target_magnification', 'overlap', 'level0_width', 'level0_height', 'name',
                'target_mpp', 'level0_mpp'):
        assert key in found.attrs, key
    assert found.attrs['level0_magnification'] == pytest.approx(20.0)
    assert (found.attrs['level0_width'], found.attrs['level0_height']) == (w, h)
    assert os.path.getsize(tmp_path / 'masks' / 'field_0.5.png') > 0


def test_40x_20x_and_10x_scans_give_the_same_physical_patches(scans, tmp_path):
    coords = {}
    for mpp, path in scans.items():
        out = tmp_path / str(mpp)
        assert tile_one(path, out)['status'] == tiling.TILED
        coords[mpp] = coords_lib.read_coords(
            coords_lib.trident_file(str(out), reader.slide_id_of(path))).coords
    # The same grid in µm: level-0 coordinates scale with 1 / mpp.
    np.testing.assert_array_equal(coords[0.25], 2 * coords[0.5])
    np.testing.assert_array_equal(coords[1.0] * 2, coords[0.5])
    patches = {}
    for mpp in scans:
        source = sources_lib.open_source(str(tmp_path / str(mpp)))
        assert len(source) == len(coords[0.5])
        patches[mpp] = np.stack([source.load(i) for i in range(len(source))])
    assert patches[0.5].shape[1:] == (64, 64, 3)
    # 40x is read at its level 1 (its 2x area average), which is how the 20x scan was
    # made: the same pixels. 10x is upsampled from 32 px: the same content, softer.
    np.testing.assert_array_equal(patches[0.25], patches[0.5])
    diff = np.abs(patches[1.0].astype(int) - patches[0.5].astype(int)).mean()
    assert diff < 8, diff


def test_patches_equal_openslides_own_read(scans, tmp_path):
    tile_one(scans[0.25], tmp_path)
    source = sources_lib.open_source(str(tmp_path))
    recs = list(map(source.record, range(len(source))))
    with openslide.OpenSlide(scans[0.25]) as slide:
        for i in (0, len(source) // 2, len(source) - 1):
            x, y = recs[i].x, recs[i].y
            want = np.asarray(slide.read_region((x, y), 1, (64, 64)))[..., :3]
            np.testing.assert_array_equal(source.load(i), want)


@needs_shared
def test_tcga_slide_is_refused_with_its_reason_then_tiled_with_mpp(tmp_path):
    out = tmp_path / 'tiles'
    code = cli.main(['--mode', 'tile', f'--config.tile.slides={SLIDES}',
                     f'--config.tile.out_dir={out}', '--config.tile.num_workers=0'])
    assert code == 0
    rows = {r['slide_id']: r for r in slides_csv.read_rows(str(out))}
    tcga = rows['tcga-cr-7395-01a-01-ts1']
    assert tcga['status'] == 'no_mpp' and 'tile.mpp' in tcga['reason']
    assert rows['cmu-1-small-region']['status'] == 'tiled'
    assert rows['cmu-1-small-region']['mpp_origin'].startswith('slide metadata')
    assert not os.path.exists(coords_lib.trident_file(str(out), 'tcga-cr-7395-01a-01-ts1'))
    # Its µm/px from a slide CSV's mpp column: tiled; the CMU slide keeps its own.
    listing = tmp_path / 'slides.csv'
    listing.write_text(f'path,mpp,label\n{TCGA},0.5,tumour\n{CMU},,normal\n')
    code = cli.main(['--mode', 'tile', f'--config.tile.slides={listing}',
                     f'--config.tile.out_dir={out}', '--config.tile.num_workers=0'])
    assert code == 0
    rows = {r['slide_id']: r for r in slides_csv.read_rows(str(out))}
    assert rows['tcga-cr-7395-01a-01-ts1']['status'] == 'tiled'
    assert rows['tcga-cr-7395-01a-01-ts1']['label'] == 'tumour'
    assert float(rows['tcga-cr-7395-01a-01-ts1']['level0_mpp']) == 0.5


def _mtime(path):
    return os.stat(path).st_mtime_ns


def test_rerun_reuses_finished_slides_and_redoes_changed_ones(scans, tmp_path):
    entries = [tiling.SlideEntry('a', scans[0.5]), tiling.SlideEntry('b', scans[1.0])]
    out = str(tmp_path)
    tiling.tile_slides(entries, tile_params(), out)
    files = {e.slide_id: coords_lib.trident_file(out, e.slide_id) for e in entries}
    before = {s: _mtime(p) for s, p in files.items()}
    rows = tiling.tile_slides(entries, tile_params(), out)
    assert {s: _mtime(p) for s, p in files.items()} == before
    assert [r['status'] for r in rows] == ['tiled', 'tiled']
    # Another setting: both redone, with other coordinates.
    old = coords_lib.read_coords(files['a']).coords
    tiling.tile_slides(entries, tile_params(overlap=32), out)
    assert all(_mtime(p) != before[s] for s, p in files.items())
    assert len(coords_lib.read_coords(files['a']).coords) > len(old)


def _tile_decodes(path, coords, size0, out_size):
    """Tiles decoded per patch when each patch is read tile by tile; the patches are
    checked against OpenSlide's own read on the way."""
    with reader.open_slide(path) as slide, reader.open_slide(path, direct=False) as plain:
        tiles = slide.tiles
        decoded = []
        original = tiles._tile
        tiles._tile = lambda level, index: decoded.append(index) or original(level, index)
        counts = []
        for x, y in coords:
            before = len(decoded)
            fast = reader.read_patch(slide, int(x), int(y), size0, out_size)
            counts.append(len(decoded) - before)
            np.testing.assert_array_equal(fast, reader.read_patch(plain, int(x), int(y),
                                                                  size0, out_size))
    return np.array(counts)


@pytest.mark.parametrize('patch', [120, 60])
def test_aligned_patches_lie_in_one_tile_each(scans, tmp_path, patch):
    """tile.align on 128-px tiles: 120-px patches start on tile corners, 60-px ones are
    packed two per tile and axis; every patch decodes one tile, where the regular grid
    of the same patches decodes more."""
    found = {}
    for align in (False, True):
        out = tmp_path / str(align)
        assert tile_one(scans[0.5], out, patch_size=patch, align=align)['status'] == 'tiled'
        found[align] = coords_lib.read_coords(coords_lib.trident_file(str(out), 'field_0.5'))
    aligned = found[True]
    assert len(aligned.coords) > 3
    offsets = aligned.coords % 128
    assert set(np.unique(offsets)) == ({0} if patch == 120 else {0, 60})
    np.testing.assert_array_equal(aligned.attrs['aligned_to_tiles'], [128, 128, 0])
    assert found[False].attrs['step_level0'] == patch
    counts = _tile_decodes(scans[0.5], aligned.coords, patch, patch)
    assert (counts == 1).all()
    regular = _tile_decodes(scans[0.5], found[False].coords, patch, patch)
    assert regular.mean() > 1.2, regular
    # Still only tissue: min_tissue applies to the aligned cells as to the regular ones.
    w, h = int(FIELD_UM[0] / 0.5), int(FIELD_UM[1] / 0.5)
    yy, xx = np.mgrid[:h, :w]
    discs = np.zeros((h, w), bool)
    for cx, cy, r in BLOBS_UM:
        discs |= (xx - cx / 0.5) ** 2 + (yy - cy / 0.5) ** 2 <= (r / 0.5) ** 2
    for x, y in aligned.coords:
        assert discs[y:y + patch, x:x + patch].mean() >= 0.4


def test_aligned_patches_of_a_40x_scan_follow_the_tiles_of_the_level_read(tmp_path):
    """At 0.25 µm/px the patches are read from level 1. Its downsample is fractional
    here (an odd level-0 width): OpenSlide finds a region's first tile from
    floor(x / downsample), which must land on the packed starts (0 or 64 in each
    128-px tile), never a pixel short of them."""
    rgb = synthetic_base(0.25)[:, :2047]
    path = write_pyramid(str(tmp_path / 'odd.tif'), rgb, 0.25)
    assert tile_one(path, tmp_path, align=True)['status'] == 'tiled'
    found = coords_lib.read_coords(coords_lib.trident_file(str(tmp_path), 'odd'))
    with reader.open_slide(path) as slide:
        assert slide.best_level(found.attrs['patch_size_level0'] / 64) == 1
        ds = slide.levels[1].downsample
    assert ds != int(ds)
    first = np.floor(found.coords / ds).astype(int)
    assert len(found.coords) > 3 and not (first % 64).any()
    np.testing.assert_array_equal(found.attrs['aligned_to_tiles'], [128, 128, 1])


@pytest.mark.parametrize('ds', [1.0, 2.0, 2.0005055500659967, 2.0076, 3.9997395833333336,
                                4.000244])
@pytest.mark.parametrize('side,tile', [(224, 240), (224, 256), (128, 256), (300, 256)])
def test_aligned_starts_stay_in_their_tiles_as_openslide_places_them(ds, side, tile):
    """OpenSlide reads a region of `side` level pixels from x / ds (level-0 x): its first
    tile is floor(x / ds) // tile, its last the tile of ceil(x / ds + side) - 1. Every
    aligned patch must start on its planned place and touch no more tiles than planned
    (one when it fits a tile), except a patch ending exactly on a tile edge at a
    fractional downsample, which reaches a sub-pixel into the next."""
    from clusiam_jax.slides import aligned_grid
    extent0 = int(40 * tile * ds)
    starts, coverage = aligned_grid._axis(extent0, int(round(side * ds)), side, tile, ds)
    assert len(starts) >= 15 and 0.5 <= coverage <= 1
    first = np.floor(starts / ds).astype(np.int64)
    last = np.ceil(starts / ds + side).astype(np.int64) - 1
    spanned = last // tile - first // tile + 1
    planned = -(-side // tile)
    exact_fit = (tile % side == 0 or side % tile == 0) and ds != int(ds)
    assert (spanned <= planned + exact_fit).all() and (spanned >= planned).all()
    if not exact_fit:
        assert (spanned == planned).all(), (ds, side, tile)
    offsets = first % tile
    assert set(np.unique(offsets)) <= set(range(0, tile, side))
    # The smallest such start: one pixel less would start a pixel earlier.
    assert (np.floor((starts - 1) / ds) < first).all()


@needs_shared
def test_aligned_patches_of_the_cc0_slide_decode_one_jpeg_tile_each(tmp_path):
    assert tile_one(CMU, tmp_path, patch_size=224, align=True)['status'] == 'tiled'
    found = coords_lib.read_coords(
        coords_lib.trident_file(str(tmp_path), 'cmu-1-small-region'))
    assert not (found.coords % 240).any()   # the scanner's 240-px JPEG tiles
    size0 = int(found.attrs['patch_size_level0'])
    assert (_tile_decodes(CMU, found.coords[:12], size0, 224) == 1).all()


def test_align_falls_back_to_the_regular_grid_and_says_why(scans, tmp_path, monkeypatch,
                                                           caplog):
    """No tile size reported, or tiles the patches would leave mostly unread (100-px
    patches on 128-px tiles: 61%): the regular grid, with the reason in the row, the
    log, and again when a rerun reuses the slide."""
    regular = tile_one(scans[0.5], tmp_path / 'regular', patch_size=100)
    row = tile_one(scans[0.5], tmp_path / 'sparse', patch_size=100, align=True)
    assert row['status'] == 'tiled' and 'cover 61%' in row['reason']
    assert row['n_patches'] == regular['n_patches']
    entries = [tiling.SlideEntry('field_0.5', scans[0.5])]
    reused = tiling.tile_slides(entries, tile_params(patch_size=100, align=True),
                                str(tmp_path / 'sparse'))
    assert reused[0]['reason'] == row['reason']
    monkeypatch.setattr(reader.Slide, 'tile_size', lambda slide, level: None)
    row = tile_one(scans[0.5], tmp_path / 'unknown', align=True)
    assert row['status'] == 'tiled' and 'does not report its tile size' in row['reason']
    assert 'tile.align' in caplog.text
    entry = tiling.SlideEntry('a', scans[0.5])
    assert tiling.tiling_key(entry, tile_params(align=True)) != tiling.tiling_key(
        entry, tile_params())


def test_align_with_overlap_is_refused(tmp_path, scans, capsys):
    args = ['--mode', 'tile', f'--config.tile.slides={scans[0.5]}',
            f'--config.tile.out_dir={tmp_path / "o"}', '--config.tile.align=True']
    assert cli.main(args + ['--config.tile.overlap=16']) == 2
    err = capsys.readouterr().err
    assert 'tile.align' in err and 'tile.overlap' in err
    assert not (tmp_path / 'o').exists()
    assert cli.main(args + ['--config.tile.num_workers=0']) == 0   # alone: accepted


def test_ome_tiff_levels_in_subifds_serve_thumbnails_tiling_and_patches(scans, tmp_path):
    """OpenSlide sees level 0 of an OME-TIFF alone; its SubIFD levels are read directly
    (thumbnails never decode level 0, 20x patches of a 40x scan come from its 2x
    level), so it tiles, aligned or not, as the same slide with its levels in plain IFDs
    does, and trains on the same patches."""
    ome = write_ome_pyramid(str(tmp_path / 'field.ome.tif'), synthetic_base(0.25), 0.25)
    with reader.open_slide(ome) as slide, reader.open_slide(scans[0.25]) as plain:
        assert slide.handle.level_count == 1 and plain.handle.level_count == 3
        assert sorted(slide.tiles.levels) == [0, 1, 2]
        assert [lv.downsample for lv in slide.levels] == [1.0, 2.0, 4.0]
        assert slide.best_level(2.0) == 1

        def no_openslide_reads(*args, **kwargs):
            raise AssertionError(f'OpenSlide read {args}')
        slide.handle.read_region = no_openslide_reads
        np.testing.assert_array_equal(reader.thumbnail(slide, 16)[0],
                                      reader.thumbnail(plain, 16)[0])
        np.testing.assert_array_equal(reader.read_patch(slide, 256, 512, 128, 64),
                                      reader.read_patch(plain, 256, 512, 128, 64))
        assert sorted(plain.tiles.levels) == [0]   # OpenSlide lists them all
    for align in (False, True):
        found = {}
        for name, path in (('ome', ome), ('plain', scans[0.25])):
            out = tmp_path / f'{name}_{align}'
            assert tile_one(path, out, align=align)['status'] == 'tiled'
            found[name] = sources_lib.open_source(str(out))
        ome_source, plain_source = found['ome'], found['plain']
        xy = [[(s.record(i).x, s.record(i).y) for i in range(len(s))] for s in found.values()]
        assert xy[0] == xy[1]
        for i in (0, len(ome_source) // 2, len(ome_source) - 1):
            np.testing.assert_array_equal(ome_source.load(i), plain_source.load(i))


def test_a_damaged_hidden_level_falls_back_to_openslides_levels(scans, tmp_path, caplog):
    """Tiles of an OME-TIFF's SubIFD levels that do not decode (not the middle ones the
    open-time check reads): the thumbnail and the patches over them are read from the
    levels OpenSlide lists instead, each said once, and the slide tiles and trains as
    its undamaged copy does."""
    import tifffile
    ome = write_ome_pyramid(str(tmp_path / 'field.ome.tif'), synthetic_base(0.25), 0.25)
    plain = tile_one(scans[0.25], tmp_path / 'plain')
    plain_source = sources_lib.open_source(str(tmp_path / 'plain'))
    x, y = plain_source.record(0).x, plain_source.record(0).y   # its level-1 tile: damaged below
    with tifffile.TiffFile(ome) as tiff:
        spans = []
        for level, index in ((2, 0), (1, (y // 2 // 128) * 8 + x // 2 // 128)):
            page = tiff.series[0].levels[level].keyframe
            assert -(-page.imagewidth // 128) == (8 if level == 1 else 4)
            spans.append((page.dataoffsets[index], page.databytecounts[index]))
    with open(ome, 'r+b') as f:
        for offset, count in spans:
            f.seek(offset)
            f.write(b'\xff' * count)
    row = tile_one(ome, tmp_path / 'damaged')
    assert row['status'] == 'tiled' and caplog.text.count('is unreadable') == 1
    assert row['n_patches'] == plain['n_patches']
    source = sources_lib.open_source(str(tmp_path / 'damaged'))
    assert (source.record(0).x, source.record(0).y) == (x, y)
    for i in (0, 1, len(source) - 1):
        np.testing.assert_array_equal(source.load(i), plain_source.load(i))
    assert caplog.text.count("read from OpenSlide's levels") == 1


def test_corrupt_and_fake_slides_are_rows_and_the_rest_is_tiled(scans, tmp_path):
    folder = tmp_path / 'slides'
    folder.mkdir()
    shutil.copy(scans[0.5], folder / 'good.tif')
    blob = open(scans[0.25], 'rb').read()
    (folder / 'truncated.tif').write_bytes(blob[:len(blob) // 3])
    (folder / 'notes.svs').write_text('not a slide')
    (folder / 'glass.tif').write_bytes(b'')
    write_pyramid(str(folder / 'empty_glass.tif'),
                  np.full((400, 400, 3), 240, np.uint8), 0.5)
    out = tmp_path / 'out'
    params = tile_params()
    rows = {r['slide_id']: r for r in tiling.tile_slides(
        tiling.list_slides(str(folder)), params, str(out), num_workers=2)}
    assert rows['good']['status'] == 'tiled'
    assert rows['notes']['status'] == 'unreadable' and rows['notes']['reason']
    assert rows['truncated']['status'] == 'unreadable'
    assert rows['glass']['status'] == 'unreadable'
    assert rows['empty_glass']['status'] == 'no_tissue'
    assert set(os.listdir(out / 'patches')) == {'good_patches.h5'}
    # No slide at all tiled: an error (non-zero exit), the CSV still written.
    os.remove(folder / 'good.tif')
    with pytest.raises(DataError, match='no slide could be tiled'):
        tiling.tile_slides(tiling.list_slides(str(folder)), params, str(tmp_path / 'o2'))
    assert len(slides_csv.read_rows(str(tmp_path / 'o2'))) == 4


def test_bad_tile_input_is_one_line(tmp_path, scans):
    with pytest.raises(DataError, match='no slide files'):
        tiling.list_slides(str(tmp_path))
    (tmp_path / 'list.csv').write_text('file\nx.svs\n')
    with pytest.raises(DataError, match='no "path" column'):
        tiling.list_slides(str(tmp_path / 'list.csv'))
    (tmp_path / 'list.csv').write_text(f'path,mpp\n{scans[0.5]},abc\n')
    with pytest.raises(DataError, match='not a number'):
        tiling.list_slides(str(tmp_path / 'list.csv'))
    code = cli.main(['--mode', 'tile', f'--config.tile.slides={tmp_path / "nope"}',
                     f'--config.tile.out_dir={tmp_path / "o"}'])
    assert code == 2
    code = cli.main(['--mode', 'tile', f'--config.tile.slides={tmp_path}',
                     f'--config.tile.out_dir={tmp_path / "o"}', '--config.data.path=x'])
    assert code == 2


def test_tissue_mask_finds_discs_and_ignores_glass_and_black():
    base = synthetic_base(2.0)
    base[:20, :20] = 5        # black corner (an empty scanner tile)
    mask = tissue.tissue_mask(base, 2.0, tissue.TissueParams(min_area_um2=1000))
    assert not mask[:20, :20].any()
    yy, xx = np.mgrid[:base.shape[0], :base.shape[1]]
    discs = np.zeros(mask.shape, bool)
    for x_um, y_um, r_um in BLOBS_UM[:2]:
        cx, cy, r = x_um / 2.0, y_um / 2.0, r_um / 2.0
        assert mask[(xx - cx) ** 2 + (yy - cy) ** 2 <= (0.8 * r) ** 2].mean() > 0.99
    for x_um, y_um, r_um in BLOBS_UM:
        discs |= (xx - x_um / 2.0) ** 2 + (yy - y_um / 2.0) ** 2 <= (1.2 * r_um / 2.0) ** 2
    assert mask[~discs].mean() < 0.01     # the glass around the discs is not tissue
    glass = np.full((100, 100, 3), 238, np.uint8)
    assert not tissue.tissue_mask(glass, 8.0, tissue.TissueParams()).any()


def test_supplied_masks_replace_detection(scans, tmp_path):
    import json
    masks = tmp_path / 'masks_in'
    masks.mkdir()
    # One square of 128 x 128 level-0 px at (64, 64): exactly 4 patches of 64.
    square = [[64, 64], [192, 64], [192, 192], [64, 192], [64, 64]]
    (masks / 'field_0.5.geojson').write_text(json.dumps({
        'type': 'FeatureCollection', 'features': [{
            'type': 'Feature', 'geometry': {'type': 'Polygon', 'coordinates': [square]},
            'properties': {'classification': {'name': 'Tissue'}}}]}))
    row = tile_one(scans[0.5], tmp_path / 'out', masks=str(masks))
    assert row['status'] == 'tiled'
    found = coords_lib.read_coords(coords_lib.trident_file(str(tmp_path / 'out'),
                                                           'field_0.5')).coords
    assert sorted(map(tuple, found)) == [(64, 64), (64, 128), (128, 64), (128, 128)]
    assert tile_one(scans[1.0], tmp_path / 'o2', masks=str(masks))['status'] == 'no_tissue'


# ------------------------------------------------------------ coordinate files

def test_clam_and_trident_files_read_back_against_openslide(scans, tmp_path):
    patches = tmp_path / 'job' / 'patches'
    patches.mkdir(parents=True)
    slide_dir = tmp_path / 'wsi'
    slide_dir.mkdir()
    shutil.copy(scans[0.25], slide_dir / 'clam_slide.tif')
    shutil.copy(scans[0.25], slide_dir / 'trident_slide.tif')
    xy = np.array([[256, 256], [512, 128], [1024, 640]], np.int64)
    with h5py.File(patches / 'clam_slide.h5', 'w') as f:   # CLAM: 64 px at level 1
        ds = f.create_dataset('coords', data=xy)
        ds.attrs.update(patch_level=1, patch_size=64, downsample=[2.0, 2.0],
                        level_dim=[1024, 768], name='clam_slide')
    with h5py.File(patches / 'trident_slide_patches.h5', 'w') as f:
        ds = f.create_dataset('coords', data=xy)
        ds.attrs.update(patch_size=64, patch_size_level0=128, level0_magnification=40,
                        target_magnification=20, overlap=0, level0_width=2048,
                        level0_height=1536, name='trident_slide')
    with pytest.raises(DataError, match='data.slide_dir'):
        sources_lib.open_source(str(tmp_path / 'job'))
    for path in (tmp_path / 'job', patches):   # the job folder or its patches/ folder
        source = sources_lib.open_source(str(path), str(slide_dir))
        recs = list(map(source.record, range(len(source))))
        assert [r.slide_id for r in recs] == ['clam_slide'] * 3 + ['trident_slide'] * 3
        with openslide.OpenSlide(scans[0.25]) as slide:
            for i, r in enumerate(recs):
                want = np.asarray(slide.read_region((r.x, r.y), 1, (64, 64)))[..., :3]
                np.testing.assert_array_equal(source.load(i), want)
    (tmp_path / 'elsewhere').mkdir()
    with pytest.raises(DataError, match='none of the 2 slides'):
        sources_lib.open_source(str(patches), str(tmp_path / 'elsewhere'))


# ------------------------------------------------------------ the training stream

@pytest.fixture(scope='module')
def tiled(scans, tmp_path_factory):
    """Two synthetic slides tiled (20x and 40x scans), 64-px patches."""
    out = tmp_path_factory.mktemp('tiled')
    entries = [tiling.SlideEntry('s20', scans[0.5]), tiling.SlideEntry('s40', scans[0.25])]
    tiling.tile_slides(entries, tile_params(), str(out))
    return out


def _equal(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in ('view1', 'view2'))


def test_slide_batches_same_for_0_and_2_workers_and_1_and_2_processes(tiled):
    cfg = dict(mean=MEAN, std=STD, batch=4, size=32)
    serial = take(data.create_train_loader(data_config(tiled, **cfg)).iterator(), 4)
    it = data.create_train_loader(data_config(tiled, workers=2, **cfg)).iterator()
    parallel = take(it, 4)
    it.close()
    assert _equal(serial, parallel)
    shares = [take(data.create_train_loader(data_config(tiled, **cfg), process_index=p,
                                            process_count=2).iterator(), 4) for p in range(2)]
    for step in range(4):
        for k in ('view1', 'view2'):
            np.testing.assert_array_equal(
                np.concatenate([shares[0][step][k], shares[1][step][k]]), serial[step][k])


def test_mid_epoch_resume_from_slides_is_exact(tiled):
    cfg = data_config(tiled, mean=MEAN, std=STD, batch=4, size=32, workers=2)
    loader = data.create_train_loader(cfg)
    it = loader.iterator()
    take(it, 3)
    state = it.get_state()
    expected = take(it, 2)
    it.close()
    again = data.create_train_loader(cfg).iterator()
    again.set_state(state)
    resumed = take(again, 2)
    again.close()
    assert _equal(resumed, expected)


def test_vanished_slide_is_skipped_once_and_listed(scans, tmp_path):
    folder = tmp_path / 'wsi'
    folder.mkdir()
    for name in ('keep', 'gone'):
        shutil.copy(scans[0.5], folder / f'{name}.tif')
    out = tmp_path / 'tiles'
    tiling.tile_slides(tiling.list_slides(str(folder)), tile_params(), str(out))
    os.remove(folder / 'gone.tif')
    loader = data.create_train_loader(
        data_config(out, mean=MEAN, std=STD, batch=4, size=32, epochs=1),
        workdir=str(tmp_path / 'run'))
    batches = list(loader.iterator())
    assert len(batches) == loader.steps_per_epoch and all(
        b['view1'].shape[0] == 4 for b in batches)
    assert loader.skipped_files() == [str(folder / 'gone.tif')]


def test_a_damaged_tile_is_a_skipped_patch_not_a_crash(scans, tmp_path):
    """A level-0 tile read directly (slides/tiles.py) that does not decode is reported
    as OpenSlide reports one, so training skips that patch, lists it and goes on."""
    import tifffile
    folder = tmp_path / 'wsi'
    folder.mkdir()
    path = str(folder / 'damaged.tif')
    shutil.copy(scans[0.5], path)
    out = tmp_path / 'tiles'
    tiling.tile_slides(tiling.list_slides(str(folder)), tile_params(), str(out))
    coords = coords_lib.read_coords(coords_lib.trident_file(str(out), 'damaged')).coords
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages[0]
        across = -(-page.imagewidth // page.tilewidth)
        middle = (page.imagelength // 2 // page.tilelength) * across + (
            page.imagewidth // 2 // page.tilewidth)   # the tile the open-time check reads
        x, y = next((x, y) for x, y in coords
                    if (y // 128) * across + x // 128 != middle)
        index = (y // 128) * across + x // 128
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(path, 'r+b') as f:
        f.seek(offset)
        f.write(b'\xff' * count)
    source = sources_lib.open_source(str(out))
    assert source._handle(0).tiles is not None   # read directly, not through OpenSlide
    damaged = [i for i, (cx, cy) in enumerate(coords) if (cx, cy) == (x, y)]
    with pytest.raises(image_io.BadImageError, match='does not decode'):
        source.load(damaged[0])
    loader = data.create_train_loader(
        data_config(out, mean=MEAN, std=STD, batch=4, size=32, epochs=1),
        workdir=str(tmp_path / 'run'))
    batches = list(loader.iterator())
    assert len(batches) == loader.steps_per_epoch
    assert any(f'x={x},y={y}' in p for p in loader.skipped_files())


def test_slide_balanced_draws_every_slide_equally_often():
    # 3 slides of 2, 5 and 40 patches.
    slide_index = np.repeat(np.arange(3, dtype=np.int32), [2, 5, 40])
    plan = epoch_plan.EpochPlan(num_records=47, global_batch=4, process_index=0,
                                process_count=1, num_epochs=1, seed=3,
                                sampling='slide_balanced', slide_index=slide_index)
    order = plan.permutation(0)
    counts = np.bincount(slide_index[order], minlength=3)
    assert len(order) == 47 and counts.max() - counts.min() <= 1
    # Within a slide, every patch is drawn before any repeats.
    small = order[slide_index[order] == 1]
    assert set(small.tolist()) == set(range(2, 7))
    per_patch = np.bincount(small - 2)
    assert per_patch.max() - per_patch.min() <= 1
    big = order[slide_index[order] == 2]
    assert len(set(big.tolist())) == len(big)   # no repeats in the big slide
    uniform = epoch_plan.EpochPlan(num_records=47, global_batch=4, process_index=0,
                                   process_count=1, num_epochs=1, seed=3)
    assert sorted(uniform.permutation(0).tolist()) == list(range(47))


def test_slide_balanced_from_a_tiling_and_from_patch_folders(tiled, tmp_path):
    from tests.helpers import write_patches
    loader = data.create_train_loader(data_config(tiled, mean=MEAN, std=STD, batch=4,
                                                  sampling='slide_balanced'))
    plan = loader.plan
    counts = np.bincount(plan.slide_index[plan.permutation(0)])
    assert len(counts) == 2 and counts.max() - counts.min() <= 1
    # Patch folders: the slide is the patch's folder (slide_0..2 under class_0/1).
    paths = write_patches(str(tmp_path / 'p'), 20)
    loader = data.create_train_loader(data_config(tmp_path / 'p', mean=MEAN, std=STD,
                                                  batch=4, sampling='slide_balanced'))
    folders = sorted({os.path.dirname(p) for p in paths})
    order = loader.plan.permutation(1)
    recs = data.discover(str(tmp_path / 'p'))
    drawn = np.bincount([folders.index(os.path.dirname(recs[i].path)) for i in order])
    assert len(drawn) == len(folders) and drawn.max() - drawn.min() <= 1


def test_normalization_from_a_fixed_sample_of_slide_patches(tiled, tmp_path):
    cfg = data_config(tiled, batch=4, stats_sample=10)
    loader = data.create_train_loader(cfg, workdir=str(tmp_path))
    assert 'fixed sample of 10 of the' in loader.normalization_origin
    source = loader.source
    sample = np.stack([source.load(int(i)) for i in
                       data.stats.sample_indices(len(source), 10)]).astype(np.float64) / 255
    np.testing.assert_allclose(loader.mean, sample.reshape(-1, 3).mean(0), atol=1e-9)
    np.testing.assert_allclose(loader.std, sample.reshape(-1, 3).std(0), atol=1e-9)
    again = data.create_train_loader(cfg, workdir=str(tmp_path))
    assert again.mean == loader.mean and 'cached' in again.normalization_origin


def test_slide_records_are_made_on_access_and_match_a_list_of_them(tiled):
    """A slide source makes its records on access (8 bytes a patch, not a list of
    objects); subsets, slide ids, labels, export groups and the monitor hold-out read from
    it agree with the same operations on a file source of the list of its records."""
    from clusiam_jax.data import records as records_lib
    from clusiam_jax.export.embed import group_by_slide
    source = sources_lib.open_source(str(tiled))
    plain = [source.record(i) for i in range(len(source))]
    listed = sources_lib.FileSource(plain)
    assert [listed.record(i) for i in range(len(listed))] == plain
    assert plain[3] == records_lib.PatchRecord(source.path(3), plain[3].slide_id, None,
                                               int(source._xy[3][0]), int(source._xy[3][1]))
    keep = np.array([5, 1, len(plain) - 1])
    subset = source.subset(keep)
    assert [subset.record(i) for i in range(len(subset))] == [plain[i] for i in keep]
    np.testing.assert_array_equal(source.slide_ids[source.slide_index],
                                  [r.slide_id for r in plain])
    assert source.labels(keep) == [plain[i].label for i in keep] == listed.labels(keep)
    lazy_groups, list_groups = group_by_slide(source), group_by_slide(listed)
    assert list(lazy_groups) == list(list_groups) and len(lazy_groups) >= 2
    for slide, members in lazy_groups.items():
        np.testing.assert_array_equal(members, list_groups[slide])
        assert all(plain[i].slide_id == slide for i in members)
    held = sources_lib.holdout_slides(source, 0.3, 7)
    for a, b in zip(held, sources_lib.holdout_slides(listed, 0.3, 7)):
        np.testing.assert_array_equal(a, b)


def test_export_groups_lists_of_records_by_slide_in_first_appearance_order():
    """group_by_slide against a dictionary built record by record: slides in the order
    they first appear, records in their order, no slide id and 'unknown_slide' one."""
    from clusiam_jax.data.records import PatchRecord
    from clusiam_jax.export.embed import UNKNOWN_SLIDE, group_by_slide
    rng = np.random.default_rng(3)
    for _ in range(20):
        ids = rng.choice(['b', 'a', 'c10', 'c2', '', None, UNKNOWN_SLIDE],
                         int(rng.integers(1, 40)))
        recs = [PatchRecord(f'p{i}.png', slide_id=s) for i, s in enumerate(ids)]
        expected = {}
        for i, r in enumerate(recs):
            expected.setdefault(r.slide_id or UNKNOWN_SLIDE, []).append(i)
        got = group_by_slide(sources_lib.FileSource(recs))
        assert list(got) == list(expected)
        assert {k: list(v) for k, v in got.items()} == expected


def test_open_slides_are_bounded_per_worker(tiled):
    source = sources_lib.open_source(str(tiled), open_slides=1)
    for i in range(len(source)):
        source.load(i)
        assert len(source._handles) <= 1
    import pickle
    copy = pickle.loads(pickle.dumps(source))
    assert len(copy._handles) == 0    # handles never cross a fork / spawn


# ------------------------------------------------------------ patch folders

def test_min_tissue_skips_background_patches(tmp_path):
    from PIL import Image

    from tests.helpers import tissue_like
    root = tmp_path / 'patches' / 'slide'
    root.mkdir(parents=True)
    glass = []
    for i in range(8):
        if i % 2:
            img = np.full((32, 32, 3), 238, np.uint8)
            glass.append(str(root / f'{i}_0.png'))
        else:
            img = (0.5 * tissue_like(32, 32, seed=i) + 0.5 * np.array([190, 80, 160]))
        Image.fromarray(img.astype(np.uint8)).save(root / f'{i}_0.png')
    cfg = data_config(tmp_path / 'patches', mean=MEAN, std=STD, batch=4, size=24, epochs=1,
                      min_tissue=0.5)
    loader = data.create_train_loader(cfg, workdir=str(tmp_path / 'run'))
    list(loader.iterator())
    assert sorted(loader.skipped_files()) == sorted(glass)


def test_slides_in_a_patch_folder_are_flagged(tmp_path):
    from PIL import Image
    (tmp_path / 'only').mkdir()
    (tmp_path / 'only' / 'a.svs').write_bytes(b'x')
    with pytest.raises(DataError, match='--mode tile'):
        sources_lib.open_source(str(tmp_path / 'only'))
    mixed = tmp_path / 'mixed' / 's'
    mixed.mkdir(parents=True)
    (mixed / 'b.ndpi').write_bytes(b'x')
    Image.new('RGB', (32, 32), (200, 50, 100)).save(mixed / '0_0.png')
    Image.new('RGB', (5000, 40), (200, 50, 100)).save(mixed / '0_1.png')
    # Slides beside images (labels, thumbnails) are refused too: training on the images
    # alone would look like success.
    with pytest.raises(DataError, match='1 whole-slide file .*beside 2 images.*--mode tile'):
        sources_lib.open_source(str(tmp_path / 'mixed'))
    (mixed / 'b.ndpi').unlink()
    source = sources_lib.open_source(str(tmp_path / 'mixed'))
    assert [os.path.basename(source.path(i)) for i in range(len(source))] == ['0_0.png', '0_1.png']
    with pytest.raises(data.BadImageError, match='far larger than a patch'):
        source.load(1)


def test_slides_csv_rows_have_the_documented_columns(tiled):
    with open(tiled / 'slides.csv', newline='') as f:
        reader_ = csv.DictReader(f)
        # The columns docs/formats.md (c2) documents, spelled out independently.
        assert tuple(reader_.fieldnames) == ('slide_id', 'path', 'label', 'level0_mpp',
                                             'mpp_origin', 'n_patches', 'tissue_fraction',
                                             'status', 'reason')
        rows = list(reader_)
    assert [r['slide_id'] for r in rows] == ['s20', 's40']
    assert rows[0]['n_patches'] == rows[1]['n_patches']


# ------------------------------------------------------------ review fixes

def test_slide_paths_are_recorded_absolute_and_earlier_rows_kept(scans, tmp_path,
                                                                 monkeypatch):
    folder = tmp_path / 'wsi'
    folder.mkdir()
    shutil.copy(scans[0.5], folder / 'one.tif')
    shutil.copy(scans[1.0], folder / 'two.tif')
    monkeypatch.chdir(tmp_path)
    tiling.tile_slides(tiling.list_slides('wsi/one.tif'), tile_params(), 'out')
    first, = slides_csv.read_rows('out')
    assert first['path'] == str(folder / 'one.tif') and float(first['tissue_fraction']) > 0
    # Another list into the same folder: one's row is kept, two's added; a rerun of one
    # reuses it and keeps its tissue fraction.
    tiling.tile_slides(tiling.list_slides('wsi/two.tif'), tile_params(), 'out')
    tiling.tile_slides(tiling.list_slides('wsi/one.tif'), tile_params(), 'out')
    rows = {r['slide_id']: r for r in slides_csv.read_rows('out')}
    assert set(rows) == {'one', 'two'}
    assert rows['one']['tissue_fraction'] == first['tissue_fraction']
    # From anywhere else, the tiling's slides are found; moved, data.slide_dir finds them.
    monkeypatch.chdir('/')
    source = sources_lib.open_source(str(tmp_path / 'out'))
    assert source.load(0).shape == (64, 64, 3)
    shutil.move(str(folder), str(tmp_path / 'moved'))
    source = sources_lib.open_source(str(tmp_path / 'out'), str(tmp_path / 'moved'))
    assert source.load(0).shape == (64, 64, 3)


def test_a_slide_csv_with_a_byte_order_mark(scans, tmp_path):
    listing = tmp_path / 'bom.csv'
    listing.write_text(f'path,mpp\n{scans[0.5]},0.5\n', encoding='utf-8-sig')
    entry, = tiling.list_slides(str(listing))
    assert entry.mpp == 0.5


def test_clam_attributes_get_their_level0_side_for_exports(scans, tmp_path):
    patches = tmp_path / 'patches'
    patches.mkdir()
    shutil.copy(scans[0.25], tmp_path / 's.tif')
    with h5py.File(patches / 's.h5', 'w') as f:   # no `downsample`: from the slide
        f.create_dataset('coords', data=np.array([[0, 0]])).attrs.update(
            patch_level=2, patch_size=32, name='s')
    source = sources_lib.open_source(str(patches), str(tmp_path))
    attrs = source.coords_attrs('s')
    assert attrs['patch_size_level0'] == 128   # 32 px at level 2 (downsample 4)
    assert (attrs['level0_width'], attrs['level0_height']) == (2048, 1536)


def test_thumbnail_read_in_bands_equals_one_read(scans):
    with reader.open_slide(scans[0.25]) as slide:
        whole, ds = reader.thumbnail(slide, 3.0)
        banded, ds2 = reader.thumbnail(slide, 3.0, band_pixels=1024 * 40)
    assert ds == ds2 and whole.shape == banded.shape == (512, 683, 3)
    assert np.abs(whole.astype(int) - banded.astype(int)).mean() < 1.0


class _SignalAt:
    """A real loader whose iterator sends SIGTERM when batch `at` is drawn."""

    def __init__(self, loader, at):
        self.loader, self.at = loader, at

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def iterator(self):
        return _SignalIterator(self.loader.iterator(), self.at)


class _SignalIterator:
    def __init__(self, it, at):
        self.it, self.at, self.drawn = it, at, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.drawn == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        self.drawn += 1
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)

    def close(self):
        self.it.close()


def test_training_from_slides_resumes_mid_epoch_bit_exactly(tiled, tmp_path):
    """SIGTERM in the middle of epoch 2 of a run reading slides; started again it ends
    with the parameters of the uninterrupted run, bit for bit."""
    import jax

    from clusiam_jax.train.loop import train
    from tests.helpers import assert_trees_equal, mesh_of, tiny_config
    config = tiny_config('clubyol', batch_size=8, image_size=32, num_epochs=2)
    config.data.path = str(tiled)
    config.data.mean, config.data.std = MEAN, STD
    config.train.checkpoint_every_epochs = 0

    def loader():
        return data.create_train_loader(config, workdir=None)
    steps = loader().steps_per_epoch
    reference = jax.device_get(train(config, str(tmp_path / 'straight'), loader(),
                                     mesh_of(1)))
    workdir = str(tmp_path / 'stopped')
    stopped = train(config, workdir, _SignalAt(loader(), steps + 1), mesh_of(1))
    assert 0 < int(stopped.step) < 2 * steps
    resumed = jax.device_get(train(config, workdir, loader(), mesh_of(1)))
    assert int(resumed.step) == 2 * steps
    assert_trees_equal(resumed, reference)


@pytest.mark.parametrize('which', ['synthetic', 'cmu', 'tcga'])
def test_direct_tile_reads_equal_openslide(scans, which):
    """Level-0 patches read tile by tile (slides/tiles.py) are OpenSlide's pixels, also
    across tile borders and the slide's edge (white outside)."""
    path = {'synthetic': scans[0.5], 'cmu': CMU, 'tcga': TCGA}[which]
    if not os.path.isfile(path):
        pytest.skip('../shared/data/slides is absent')
    with reader.open_slide(path) as slide, reader.open_slide(path, direct=False) as plain:
        assert slide.tiles is not None and 0 in slide.tiles.levels
        w, h = slide.dimensions
        rng = np.random.default_rng(1)
        spots = [(int(x), int(y)) for x, y in zip(rng.integers(0, w - 100, 12),
                                                  rng.integers(0, h - 100, 12))]
        spots += [(w - 100, h - 60), (0, 0)]   # over the right and bottom edges
        for x, y in spots:
            np.testing.assert_array_equal(reader.read_patch(slide, x, y, 150, 150),
                                          reader.read_patch(plain, x, y, 150, 150))
