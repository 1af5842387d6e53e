"""Cluster maps: colored cells sit at the patches' level-0 coordinates; maps of slide
exports are drawn over the slide itself, titled, and never replaced by blank-canvas ones."""

import logging
import os

import h5py
import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from clusiam_jax.errors import ConfigError, DataError
from clusiam_jax.export import format as fmt
from clusiam_jax.export.maps import (
    draw_cluster_map,
    draw_export_maps,
    header_height,
    legend_font_size,
    map_background,
    title_font_size,
)
from clusiam_jax.export.palette import (
    HE_REFERENCES,
    _srgb_to_lab,
    cluster_palette,
    delta_e_2000,
    in_he_hues,
)


def _blend(under, color, alpha):
    return np.round((1 - alpha) * np.asarray(under, float)
                    + alpha * np.asarray(color, float)).astype(np.uint8)


def test_delta_e_2000_matches_sharmas_test_pairs():
    # Sharma, Wu & Dalal (2005), Table 1: pairs 1, 3, 7, 13, 17, 19, 25, 34.
    pairs = [((50, 2.6772, -79.7751), (50, 0, -82.7485), 2.0425),
             ((50, 2.8361, -74.0200), (50, 0, -82.7485), 3.4412),
             ((50, 0, 0), (50, -1, 2), 2.3669),
             ((50, 2.5, 0), (56, -27, -3), 31.9030),
             ((50, 2.5, 0), (50, 3.1736, 0.5854), 1.0),
             ((50, 2.5, 0), (50, 3.2972, 0), 1.0),
             ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
             ((2.0776, 0.0795, -1.1350), (0.9033, -0.0636, -0.5514), 0.9082)]
    a, b, want = (np.array(v, float) for v in zip(*pairs))
    np.testing.assert_allclose(delta_e_2000(a, b), want, atol=1e-4)
    np.testing.assert_allclose(delta_e_2000(b, a), want, atol=1e-4)


def _min_pairwise(colors):
    lab = _srgb_to_lab(colors / 255.0)
    dist = delta_e_2000(lab[:, None], lab[None])
    np.fill_diagonal(dist, np.inf)
    return dist.min()


def test_palette_colors_stay_distinct_and_away_from_h_and_e():
    """CIEDE2000 (about 2: just noticeable; 10+: another color at a glance). Ten colors:
    more than 20 apart, clearly different hues or lightness (no three reds or blues: the
    old CIE76 palette's three blues were 16 apart). A hundred colors cannot all be that
    far apart in sRGB (the best known sets of 100 reach about 9); more than 7.5, what this
    palette reaches (7.7) and above a fixed Glasbey palette's 7.0. Every color more than
    20 from H&E's haematoxylin (80, 60, 140), eosin (230, 150, 190) and white glass (and
    the darker, deeper, mixed and pale variants), and none with a hue of H&E."""
    colors = cluster_palette(128)
    assert colors.shape == (128, 3) and colors.dtype == np.uint8
    assert _min_pairwise(colors[:10]) > 20
    assert _min_pairwise(colors[:100]) > 7.5
    for k in (10, 100):                         # computed per K, the same colors
        np.testing.assert_array_equal(cluster_palette(k), colors[:k])
    stains = _srgb_to_lab(np.array([[80, 60, 140], [230, 150, 190], [255, 255, 255]]) / 255.0)
    lab = _srgb_to_lab(colors / 255.0)
    assert delta_e_2000(lab[:, None], stains[None]).min() > 20
    assert delta_e_2000(lab[:, None], _srgb_to_lab(HE_REFERENCES / 255.0)[None]).min() > 20
    assert not in_he_hues(lab).any()
    # Purple and pink are H&E's: a magenta, a violet and a pink are refused.
    assert in_he_hues(_srgb_to_lab(np.array([[255, 0, 255], [128, 0, 255], [255, 105, 180]])
                                   / 255.0)).all()
    # Overlays show over tissue and white: not too dark, light or grey.
    assert (lab[:, 0] > 30).all() and (lab[:, 0] < 88).all()
    assert (np.hypot(lab[:, 1], lab[:, 2]) > 30).all()


def test_mosaic_cells_have_cluster_colors_and_background_elsewhere(tmp_path):
    # A 3x2 grid of 224-px patches with a hole, drawn at downsample 16 (14-px
    # cells) on a canvas sized from the slide (larger than the patches' extent).
    coords = np.array([[0, 0], [224, 0], [448, 0], [0, 224], [448, 224]])
    ids = np.array([0, 5, 5, 2, 7])
    out = tmp_path / 'map.png'
    image = draw_cluster_map(coords, ids, 224, downsample=16, slide_dimensions=(1000, 600),
                             alpha=0.6, background=(250, 250, 250), out_path=out)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), image)
    height, width = int(np.ceil(600 / 16)), int(np.ceil(1000 / 16))
    # The legend is appended on the right (and the canvas extended below with
    # background when the map is too short for it).
    assert image.shape[0] >= height and image.shape[1] > width
    assert (image[height:, :width] == 250).all()
    palette = cluster_palette(128)
    painted = np.zeros((height, width), bool)
    for (x, y), cid in zip(coords, ids):
        x0, y0 = x // 16, y // 16
        cell = image[y0:y0 + 14, x0:x0 + 14]
        assert (cell == _blend((250, 250, 250), palette[cid], 0.6)).all()
        painted[y0:y0 + 14, x0:x0 + 14] = True
    assert (image[:height, :width][~painted] == 250).all()   # the hole and the margin
    # The legend shows each cluster's pure color once per cluster present.
    legend = image[:, width:].reshape(-1, 3)
    for cid in np.unique(ids):
        assert (legend == palette[cid]).all(axis=1).any()


def test_blends_over_thumbnail_with_downsample_from_slide_dimensions():
    thumb = np.zeros((50, 80, 3), np.uint8)
    thumb[..., 0] = np.arange(80)[None, :]        # a gradient to check per-pixel blending
    thumb[..., 2] = 200
    coords = np.array([[160, 80], [800, 400]])    # level 0; the slide is 1600 x 1000
    image = draw_cluster_map(coords, [3, 1], patch_size=80, thumbnail=Image.fromarray(thumb),
                             slide_dimensions=(1600, 1000), alpha=0.25, legend=False)
    assert image.shape == thumb.shape             # downsample 20, 4-px cells
    palette = cluster_palette(128)
    expect = thumb.copy()
    expect[4:8, 8:12] = _blend(thumb[4:8, 8:12], palette[3], 0.25)
    expect[20:24, 40:44] = _blend(thumb[20:24, 40:44], palette[1], 0.25)
    np.testing.assert_array_equal(image, expect)


def test_canvas_from_patch_extent_and_tiny_cells():
    # No slide size: the canvas spans max coordinate + patch size; a cell is
    # at least one pixel even when the patch is smaller than the downsample.
    image = draw_cluster_map([[0, 0], [90, 30]], [0, 1], patch_size=10, downsample=20,
                             legend=False, alpha=1.0)
    assert image.shape == (2, 5, 3)
    palette = cluster_palette(128)
    assert (image[0, 0] == palette[0]).all() and (image[1, 4] == palette[1]).all()
    assert (image[0, 1:] == 255).all()


def test_rejects_bad_inputs():
    with pytest.raises(ValueError):
        draw_cluster_map([[0, 0]], [-1], 10)
    with pytest.raises(ValueError):
        draw_cluster_map([[0, 0]], [0], 10, thumbnail=np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match='non-negative'):
        draw_cluster_map([[0, 0]], [-1], 10)
    with pytest.raises(ConfigError, match='alpha'):
        draw_cluster_map([[0, 0]], [0], 10, alpha=1.5)


# ------------------------------------------------------------------ title and legend

def _dark_runs(region):
    """Lengths of the vertical runs of rows that hold a dark (text) pixel, top first."""
    dark = (np.asarray(region) < 100).all(axis=-1).any(axis=1)
    runs, length = [], 0
    for row in dark:
        if row:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs + ([length] if length else [])


def test_title_band_sits_above_an_unchanged_map():
    coords = np.array([[0, 0], [320, 160], [640, 480]])
    kwargs = dict(downsample=8, slide_dimensions=(1600, 1200), alpha=0.7)
    plain = draw_cluster_map(coords, [0, 1, 2], 160, **kwargs)
    title = 'slide_a · step 12 · K=3 · run demo'
    titled = draw_cluster_map(coords, [0, 1, 2], 160, title=title, **kwargs)
    top = header_height(150, 200, title)
    assert top > 0 and header_height(150, 200, None) == 0
    # The band is the only difference: the map (and legend) below it are pixel-identical.
    assert titled.shape[0] == plain.shape[0] + top
    np.testing.assert_array_equal(titled[top:, :plain.shape[1]], plain)
    assert (titled[:top] < 100).all(axis=-1).any()          # dark title text in the band


def test_legend_header_and_title_grow_with_the_map():
    """Text that reads on a 64-px map is a few pixels on a 2048-px one shown on a screen:
    the legend (with its "cluster: patches" header) and the title scale up."""
    heights, title_heights = {}, {}
    for side in (64, 2048):
        coords = np.array([[0, 0], [side // 2, side // 2]])
        image = draw_cluster_map(coords, [3, 7], side // 4, downsample=1,
                                 slide_dimensions=(side, side), title='slide · K=8')
        top = header_height(side, side, 'slide · K=8')
        legend = image[top:, side:]
        # The header is the legend's first line of text (above the first swatch).
        heights[side] = _dark_runs(legend)[0]
        title_heights[side] = _dark_runs(image[:top - 1])[0]   # above the band's rule
    assert legend_font_size(2048) >= 3 * legend_font_size(64)
    assert title_font_size(2048, 2048) >= 3 * title_font_size(64, 64)
    assert heights[2048] >= 2.5 * heights[64] and heights[64] >= 7
    assert title_heights[2048] >= 2.5 * title_heights[64]


# ------------------------------------------------------------------ slide exports

SLIDE_SIZE = (1024, 768)   # level-0 width, height
MAX_SIDE = 256             # thumbnail 256 x 192: downsample 4
PATCH = 128                # level-0 px: 32-px cells
K = 12


def _write_slide(path):
    """A generic tiled TIFF (what OpenSlide reads as generic-tiff) of 16-px blocks of
    random colors: blocks align with the thumbnail's 4-px cells, so any area-averaging
    thumbnail has their exact colors."""
    rng = np.random.default_rng(1)
    blocks = rng.integers(30, 226, (SLIDE_SIZE[1] // 16, SLIDE_SIZE[0] // 16, 3), np.uint8)
    image = np.repeat(np.repeat(blocks, 16, axis=0), 16, axis=1)
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(256, 256), compression='zlib', photometric='rgb',
                  resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit='CENTIMETER')


def _write_export(out_dir, slide_path, coords, ids, info=True):
    """A one-slide h5 export as read_slide reads exports made from whole slides."""
    os.makedirs(out_dir / fmt.H5_DIR)
    n = len(coords)
    with h5py.File(out_dir / fmt.H5_DIR / 's1.h5', 'w') as f:
        f['features'] = np.zeros((n, 4), np.float32)
        f['coords'] = np.asarray(coords, np.int64)
        f['cluster_ids'] = np.asarray(ids, np.int32)
        f['cluster_logits'] = np.eye(K, dtype=np.float32)[ids]
        f['coords'].attrs.update(patch_level=0, patch_size=64, patch_size_level0=PATCH,
                                 level0_width=SLIDE_SIZE[0], level0_height=SLIDE_SIZE[1])
        if slide_path is not None:
            f.attrs['slide_path'] = str(slide_path)
    fmt.write_manifest(str(out_dir), [dict(slide_id='s1', n_patches=n, label='',
                                           file=f'{fmt.H5_DIR}/s1.h5')])
    if info:
        fmt.write_info(str(out_dir), {'checkpoint_step': 7, 'workdir': '/runs/demo_run/'})


@pytest.fixture
def slide_export(tmp_path):
    slide = tmp_path / 'slides' / 's1.tif'
    os.makedirs(slide.parent)
    _write_slide(slide)
    coords = [(0, 0), (128, 0), (384, 128), (896, 640), (512, 256), (640, 256)]
    ids = [0, 5, 11, 3, 5, 9]
    out = tmp_path / 'export'
    _write_export(out, slide, coords, ids)
    return out, slide, np.array(coords), np.array(ids)


def test_slide_export_map_is_drawn_over_the_slides_own_thumbnail(slide_export):
    out, slide, coords, ids = slide_export
    written = draw_export_maps(str(out), alpha=0.4, max_side=MAX_SIDE)
    assert written == [str(out / 'cluster_maps' / 's1.png')]
    png = Image.open(written[0])
    title = 's1 · step 7 · K=12 · run demo_run'
    assert png.text['clusiam_background'] == 'slide' and png.text['Title'] == title
    image = np.asarray(png.convert('RGB'))
    top = header_height(192, 256, title)
    assert int(png.text['clusiam_map_top']) == top > 0
    assert (image[:top] < 100).all(axis=-1).any()              # the title is drawn

    # Reference: the slide's level-0 pixels read here with OpenSlide, averaged over
    # the 4 x 4 level-0 pixels of each map pixel.
    with openslide.OpenSlide(str(slide)) as reference:
        level0 = np.asarray(reference.read_region((0, 0), 0, SLIDE_SIZE))[..., :3]
    thumb = level0.reshape(192, 4, 256, 4, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    expect = thumb.copy()
    palette = cluster_palette(128)
    for (x, y), cid in zip(coords, ids):
        cell = np.s_[y // 4:(y + PATCH) // 4, x // 4:(x + PATCH) // 4]
        expect[cell] = _blend(thumb[cell], palette[cid], 0.4)
    # Painted cells are the blend of the slide and the cluster's color; the rest is the
    # slide's thumbnail, untouched.
    np.testing.assert_array_equal(image[top:top + 192, :256], expect)


def test_a_missing_slide_is_an_error_naming_it_never_a_blank_map(slide_export):
    out, slide, _, _ = slide_export
    os.remove(slide)
    with pytest.raises(DataError) as error:
        draw_export_maps(str(out), max_side=MAX_SIDE)
    message = str(error.value)
    assert 'slide s1' in message and str(slide) in message and 'thumbnail' in message
    assert len(message.splitlines()) == 1
    assert not os.path.exists(out / 'cluster_maps' / 's1.png')
    # Given a thumbnail instead, the map is drawn over it.
    os.makedirs(out.parent / 'thumbs')
    Image.new('RGB', (128, 96), (10, 20, 30)).save(out.parent / 'thumbs' / 's1.png')
    written = draw_export_maps(str(out), thumbnail=str(out.parent / 'thumbs'), downsample=8)
    assert map_background(written[0]) == 'thumbnail'


def test_a_mosaic_map_never_replaces_one_drawn_over_the_slide(slide_export, caplog):
    out, _, _, _ = slide_export
    path = out / 'cluster_maps' / 's1.png'
    draw_export_maps(str(out), max_side=MAX_SIDE)
    original = path.read_bytes()
    # The same export without its slide (as an export of patches): the mosaic map goes
    # next to the slide's map, which stays byte for byte.
    with h5py.File(out / fmt.H5_DIR / 's1.h5', 'a') as f:
        del f.attrs['slide_path']
    with caplog.at_level(logging.WARNING, logger='clusiam_jax'):
        written = draw_export_maps(str(out), max_side=MAX_SIDE)
    mosaic = out / 'cluster_maps' / 's1.mosaic.png'
    assert written == [str(mosaic)] and map_background(str(mosaic)) == 'mosaic'
    assert path.read_bytes() == original
    assert str(mosaic) in caplog.text and 'over its slide' in caplog.text
    # A thumbnail map replaces it; a mosaic map again does not.
    os.makedirs(out.parent / 'thumbs')
    Image.new('RGB', (128, 96), (10, 20, 30)).save(out.parent / 'thumbs' / 's1.png')
    assert draw_export_maps(str(out), thumbnail=str(out.parent / 'thumbs'),
                            downsample=8) == [str(path)]
    assert map_background(str(path)) == 'thumbnail'
    thumbnail_map = path.read_bytes()
    assert draw_export_maps(str(out)) == [str(mosaic)]
    assert path.read_bytes() == thumbnail_map


def test_mosaic_maps_replace_mosaic_maps_and_keep_unrecorded_ones(tmp_path):
    out = tmp_path / 'export'
    _write_export(out, None, [(0, 0), (128, 128)], [1, 2], info=False)
    path = out / 'cluster_maps' / 's1.png'
    assert draw_export_maps(str(out)) == [str(path)]
    png = Image.open(path)
    # No export_info.json: the title leaves out the step and the run.
    assert png.text['Title'] == 's1 · K=12' and png.text['clusiam_background'] == 'mosaic'
    assert draw_export_maps(str(out), alpha=0.9) == [str(path)]   # replaced in place
    # A map from an older version records nothing: it may be over a thumbnail, so it stays.
    Image.new('RGB', (8, 8)).save(path)
    assert draw_export_maps(str(out)) == [str(out / 'cluster_maps' / 's1.mosaic.png')]
    with pytest.raises(ConfigError, match='alpha'):
        draw_export_maps(str(out), alpha=-0.1)


def test_legend_lists_clusters_in_decreasing_share(tmp_path):
    """A crafted export whose largest clusters have the highest ids: the legend starts
    with them, each with its share, not with the 1-patch clusters of low ids."""
    counts = {0: 1, 1: 1, 2: 1, 4: 2, 5: 6, 9: 9, 11: 20}          # 40 patches
    ids = np.concatenate([np.full(n, c) for c, n in counts.items()])
    coords = [(x * 16, y * 16) for y in range(5) for x in range(8)]
    out = tmp_path / 'export'
    _write_export(out, None, coords, ids)
    image = np.asarray(Image.open(draw_export_maps(str(out))[0]).convert('RGB'))
    top = int(Image.open(out / 'cluster_maps' / 's1.png').text['clusiam_map_top'])
    legend = image[top:, SLIDE_SIZE[0]:]   # right of the 1024-px map (downsample 1)
    palette = cluster_palette(128)
    first_row = {}
    for c in counts:   # the row where the cluster's swatch (its pure color) starts
        rows = np.flatnonzero((legend == palette[c]).all(axis=-1).any(axis=1))
        first_row[c] = rows.min()
    assert sorted(counts, key=first_row.get) == [11, 9, 5, 4, 0, 1, 2]
    # Each entry reads `id: patches (share)`; ties by id.
    from clusiam_jax.export.maps import legend_order, share_text
    ordered, n = legend_order(list(counts), list(counts.values()))
    assert ordered.tolist() == [11, 9, 5, 4, 0, 1, 2] and n.tolist() == [20, 9, 6, 2, 1, 1, 1]
    assert [share_text(v, 40) for v in (20, 2, 1)] == ['50%', '5.0%', '2.5%']
    assert share_text(1, 5000) == '<0.1%' and share_text(3, 1000) == '0.3%'
