"""Fresh patch positions inside the tissue (data.sampling=tissue_random): the tissue mask the
tiling keeps in each coordinate file, and the positions drawn from it.

The reference for "keeps the rule" is a brute force written here: every integer position of
a small slide, its square's mask pixels averaged by slicing (the product uses an integral
image). The draw must hit exactly those positions, each equally often; the stored mask must
equal tissue detection run here on OpenSlide's own read of the same level, or the supplied
polygon drawn here.
"""
import json
import math

import h5py
import numpy as np
import openslide
import pytest
from scipy import stats

from clusiam_jax import storage
from clusiam_jax.config import default_config
from clusiam_jax.errors import DataError
from clusiam_jax.slides import coords as coords_lib
from clusiam_jax.slides import reader, tiling, tissue
from clusiam_jax.slides.tissue_positions import TissueSampler, draw_positions, keeps_rule
from tests.helpers import synthetic_tissue, within, write_pyramid


def span(p, size0, ds, n):
    """Mask pixels [a, b) under a square at level-0 p: the documented rounding."""
    a = min(max(int(np.round(p / ds)), 0), n)
    b = min(max(int(np.round((p + size0) / ds)), 0), n)
    return a, min(max(b, a + 1), n)


def fraction(mask, x, y, size0, ds):
    h, w = mask.shape
    (x0, x1), (y0, y1) = span(x, size0, ds, w), span(y, size0, ds, h)
    cut = mask[y0:y1, x0:x1]
    return float(cut.mean()) if cut.size else 0.0


def valid_positions(mask, ds, size0, min_tissue, width, height):
    """Every integer position whose square lies in the slide and keeps the rule."""
    out = []
    for y in range(math.floor(height - size0) + 1):
        for x in range(math.floor(width - size0) + 1):
            f = fraction(mask, x, y, size0, ds)
            if f >= min_tissue and f > 0:
                out.append((x, y))
    return out


@pytest.mark.parametrize('ds, size0, min_tissue', [
    (1.0, 5, 0.5), (4.0, 8, 0.5), (3.7, 11, 0.25), (2.5, 6, 0.0), (3.0, 7, 1.0),
    (3.0, 9.5, 0.5)])   # a fractional side: a patch at another µm/px than the grid's
def test_draws_hit_exactly_the_positions_that_keep_the_rule(ds, size0, min_tissue):
    rng = np.random.default_rng(int(ds * 10 + size0))
    mask = rng.random((11, 13)) < 0.5
    mask[3:8, 4:10] = True   # a block, so that even min_tissue 1 has positions
    width, height = int(13 * ds), int(11 * ds)
    valid = set(valid_positions(mask, ds, size0, min_tissue, width, height))
    sampler = TissueSampler(mask, ds, size0, min_tissue)
    assert sampler.level0_size == (width, height)
    assert sampler.total == len(valid) > 0
    drawn = sampler.draw(20 * len(valid), seed=1, epoch=0, slide_index=3)
    assert drawn.dtype == np.int64 and drawn.shape == (20 * len(valid), 2)
    assert set(map(tuple, drawn.tolist())) == valid   # nothing else, and all of it
    assert keeps_rule(mask, drawn, size0, ds, min_tissue).all()


def test_each_position_is_equally_likely():
    rng = np.random.default_rng(5)
    mask = rng.random((9, 12)) < 0.55
    ds, size0 = 3.7, 7
    valid = valid_positions(mask, ds, size0, 0.3, int(12 * ds), int(9 * ds))
    index = {p: i for i, p in enumerate(valid)}
    drawn = draw_positions(mask, ds, size0, 100 * len(valid), 0.3, 0, 2, 0)
    counts = np.bincount([index[p] for p in map(tuple, drawn.tolist())], minlength=len(valid))
    assert stats.chisquare(counts).pvalue > 1e-3
    # The offset inside a mask pixel too: x mod ds is spread as it is over the valid set.
    want = np.bincount(np.array([x for x, _ in valid]) % 4, minlength=4)
    got = np.bincount(drawn[:, 0] % 4, minlength=4)
    assert stats.chisquare(got, want * len(drawn) / want.sum()).pvalue > 1e-3


def test_two_equal_blobs_get_half_each():
    yy, xx = np.mgrid[:60, :120]
    mask = ((xx - 30) ** 2 + (yy - 30) ** 2 < 20 ** 2) | ((xx - 90) ** 2 + (yy - 30) ** 2 < 20 ** 2)
    n = 4000
    drawn = draw_positions(mask, 8.0, 48, n, 0.5, seed=7, epoch=1, slide_index=0)
    left = float(np.mean(drawn[:, 0] + 24 < 60 * 8))
    assert within(left, 0.5, n), left


def test_the_same_numbers_draw_the_same_positions_and_others_do_not():
    mask = np.zeros((40, 50), bool)
    mask[5:35, 8:45] = True
    draw = lambda seed, epoch, slide: draw_positions(mask, 4.0, 32, 500, 0.5, seed, epoch,
                                                     slide)
    first = draw(0, 0, 0)
    np.testing.assert_array_equal(first, draw(0, 0, 0))
    assert (draw(-1, 0, 0) != first).any()   # a negative seed is a seed too
    sampler = TissueSampler(mask, 4.0, 32, 0.5)   # kept for many epochs: the same draws
    np.testing.assert_array_equal(sampler.draw(500, 0, 0, 0), first)
    for other in (draw(0, 1, 0), draw(0, 0, 1), draw(1, 0, 0)):
        assert (other != first).any(axis=1).mean() > 0.95


def test_squares_stay_inside_the_given_slide_size():
    mask = np.ones((20, 30), bool)   # tissue to the edges
    drawn = draw_positions(mask, 4.0, 16, 3000, 1.0, 0, 0, 0, level0_size=(117, 75))
    assert drawn.min() >= 0
    assert (drawn[:, 0] + 16 <= 117).all() and (drawn[:, 1] + 16 <= 75).all()
    assert drawn[:, 0].max() == 117 - 16 and drawn[:, 1].max() == 75 - 16


def test_a_slide_without_a_position_that_keeps_the_rule_is_one_line_naming_it():
    mask = np.zeros((30, 30), bool)
    mask[10, 10] = True   # one pixel: never half of an 8-pixel square
    with pytest.raises(DataError, match='^slide_7: no square of 64 level-0 px has tissue '
                                        '>= 0.5'):
        draw_positions(mask, 8.0, 64, 10, 0.5, 0, 0, 0, name='slide_7')
    with pytest.raises(DataError, match='slide_8'):
        draw_positions(np.zeros((30, 30), bool), 8.0, 64, 10, 0.0, 0, 0, 0, name='slide_8')
    with pytest.raises(DataError, match='slide_9'):   # larger than the slide
        draw_positions(np.ones((3, 3), bool), 8.0, 64, 10, 0.0, 0, 0, 0, name='slide_9')


# ------------------------------------------------------------ the tiling keeps its mask

def tile_params(**overrides):
    c = default_config().tile
    c.patch_size, c.target_mpp, c.tissue_mpp, c.min_area_um2 = 32, 1.0, 4.0, 1000.0
    for key, value in overrides.items():
        c[key] = value
    return tiling.TileParams.from_config(c)


@pytest.fixture(scope='module')
def slide(tmp_path_factory):
    """512 x 384 px at 1 µm/px, two discs; its level 2 (4 µm/px) is what detection reads."""
    rgb = synthetic_tissue(384, 512, [(150, 140, 90), (380, 250, 80)], seed=3)
    return write_pyramid(str(tmp_path_factory.mktemp('slide') / 'two_discs.tif'), rgb, 1.0,
                         min_side=90)


def tile(slide, out, **overrides):
    params = tile_params(**overrides)
    row = tiling.tile_slide(tiling.SlideEntry('two_discs', slide), params, str(out))
    assert row['status'] == tiling.TILED, row
    return coords_lib.trident_file(str(out), 'two_discs'), params


def test_tiling_stores_the_mask_it_kept_patches_by(slide, tmp_path):
    path, params = tile(slide, tmp_path)
    mask, ds = coords_lib.read_tissue_mask(path)
    # The reference: OpenSlide's own level 2 (4 level-0 px per pixel), detected here.
    with openslide.OpenSlide(slide) as osl:
        assert osl.level_downsamples[2] == 4.0
        rgb = np.asarray(osl.read_region((0, 0), 2, osl.level_dimensions[2]))[..., :3]
    want = tissue.tissue_mask(np.ascontiguousarray(rgb), 4.0, params.detection)
    assert ds == 4.0 and mask.dtype == bool
    np.testing.assert_array_equal(mask, want)
    assert 0.2 < mask.mean() < 0.6
    with h5py.File(path, 'r') as f:
        stored = f[coords_lib.TISSUE_MASK]
        assert stored.dtype == np.uint8 and stored.compression == 'gzip'
        assert float(stored.attrs['tissue_downsample']) == 4.0
    found = coords_lib.read_tissue(path)
    assert found.min_tissue == params.min_tissue and found.level0_size == (512, 384)
    assert coords_lib.read_coords(path).has_tissue_mask
    # The grid kept is every grid square that keeps the rule on the stored mask ...
    coords = coords_lib.read_coords(path).coords
    grid = [(x, y) for y in range(0, 384 - 32 + 1, 32) for x in range(0, 512 - 32 + 1, 32)]
    keep = [p for p in grid if fraction(mask, *p, 32, ds) >= params.min_tissue
            and fraction(mask, *p, 32, ds) > 0]
    assert sorted(map(tuple, coords.tolist())) == sorted(keep)
    # ... and fresh positions keep it too, inside the slide.
    drawn = draw_positions(mask, ds, 32, 2000, found.min_tissue, 0, 0, 0, found.level0_size)
    assert all(fraction(mask, x, y, 32, ds) >= params.min_tissue for x, y in drawn)
    assert (drawn >= 0).all() and (drawn + 32 <= [512, 384]).all()


def test_with_polygons_the_mask_is_the_polygons_and_positions_stay_inside(slide, tmp_path):
    masks = tmp_path / 'polygons'
    masks.mkdir()
    square = [[100, 60], [300, 60], [300, 220], [100, 220], [100, 60]]
    (masks / 'two_discs.geojson').write_text(json.dumps({
        'type': 'Feature', 'properties': {},
        'geometry': {'type': 'Polygon', 'coordinates': [square]}}))
    path, _ = tile(slide, tmp_path / 'out', masks=str(masks), min_tissue=1.0)
    mask, ds = coords_lib.read_tissue_mask(path)
    want = np.zeros((96, 128), bool)
    want[15:56, 25:76] = True   # the square at 4 level-0 px per pixel, edges filled
    np.testing.assert_array_equal(mask, want)
    drawn = draw_positions(mask, ds, 32, 3000, 1.0, 0, 0, 0)
    # Whole squares inside the polygon, to within its edge pixels and the rounding.
    slack = 1.5 * ds
    assert (drawn[:, 0] >= 100 - slack).all() and (drawn[:, 0] + 32 <= 300 + slack).all()
    assert (drawn[:, 1] >= 60 - slack).all() and (drawn[:, 1] + 32 <= 220 + slack).all()


def test_a_retiling_rewrites_the_mask(slide, tmp_path):
    path, _ = tile(slide, tmp_path)
    first = coords_lib.read_tissue(path)
    tiling.tile_slides([tiling.SlideEntry('two_discs', slide)],
                       tile_params(tissue_mpp=2.0, min_tissue=0.25), str(tmp_path))
    again = coords_lib.read_tissue(path)
    assert (first.downsample, again.downsample) == (4.0, 2.0)
    assert again.mask.shape == (192, 256) and again.min_tissue == 0.25


def test_older_tilings_and_clam_files_have_no_mask(slide, tmp_path):
    coords = np.array([[0, 0], [32, 0]], np.int64)
    older = str(tmp_path / 'older_patches.h5')
    coords_lib.write_trident(older, coords, {'patch_size': 32, 'patch_size_level0': 32})
    clam = str(tmp_path / 'clam.h5')
    with h5py.File(clam, 'w') as f:
        f.create_dataset('coords', data=coords).attrs.update(patch_level=0, patch_size=32)
    for path in (older, clam):
        assert coords_lib.read_tissue_mask(path) is None
        assert coords_lib.read_tissue(path) is None
        assert not coords_lib.read_coords(path).has_tissue_mask
    with h5py.File(older, 'a') as f:   # damaged: a mask without its downsample
        f.create_dataset(coords_lib.TISSUE_MASK, data=np.ones((4, 4), np.uint8))
    with pytest.raises(DataError, match='older_patches.h5: tissue_mask has no positive '
                                        'tissue_downsample'):
        coords_lib.read_tissue_mask(older)


def test_a_mask_in_a_bucket_reads_as_the_local_one(slide, tmp_path, bucket):
    path, _ = tile(slide, tmp_path)
    url = storage.join(bucket, 'patches', 'two_discs_patches.h5')
    storage.upload(path, url)
    mask, ds = coords_lib.read_tissue_mask(url)
    local_mask, local_ds = coords_lib.read_tissue_mask(path)
    np.testing.assert_array_equal(mask, local_mask)
    assert ds == local_ds
    assert coords_lib.read_tissue(url).level0_size == (512, 384)


def test_detection_thumbnail_is_the_level_the_reference_reads(slide):
    """The reference above reads level 2 whole; the tiling's thumbnail must be that level."""
    with reader.open_slide(slide) as s:
        small, ds = reader.thumbnail(s, 4.0)
    with openslide.OpenSlide(slide) as osl:
        rgb = np.asarray(osl.read_region((0, 0), 2, osl.level_dimensions[2]))[..., :3]
    assert ds == 4.0
    np.testing.assert_array_equal(small, rgb)


def test_a_rerun_redoes_a_slide_tiled_before_masks_were_stored(slide, tmp_path, caplog):
    path, params = tile(slide, tmp_path)
    found = coords_lib.read_coords(path)
    coords_lib.write_trident(path, found.coords, found.attrs)   # as tiled before
    assert coords_lib.read_tissue(path) is None
    with caplog.at_level('INFO', logger='clusiam_jax'):
        tiling.tile_slides([tiling.SlideEntry('two_discs', slide)], params, str(tmp_path))
    assert 'tiled before the tissue mask was stored' in caplog.text
    assert coords_lib.read_tissue(path) is not None
    np.testing.assert_array_equal(coords_lib.read_coords(path).coords, found.coords)
