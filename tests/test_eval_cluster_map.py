"""Cluster maps: colored cells sit at the patches' level-0 coordinates."""

import numpy as np
import pytest
from PIL import Image

from clusiam_jax.eval.cluster_map import _srgb_to_lab, cluster_palette, draw_cluster_map


def _blend(under, color, alpha):
    return np.round((1 - alpha) * np.asarray(under, float)
                    + alpha * np.asarray(color, float)).astype(np.uint8)


def test_palette_has_100_clearly_distinct_colors():
    colors = cluster_palette(128)
    assert colors.shape == (128, 3) and colors.dtype == np.uint8
    lab = _srgb_to_lab(colors[:100] / 255.0)
    dist = np.linalg.norm(lab[:, None] - lab[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    assert dist.min() > 15            # CIE76 delta-E: distinct at a glance
    np.testing.assert_array_equal(cluster_palette(10), colors[:10])


def test_mosaic_cells_have_cluster_colors_and_background_elsewhere(tmp_path):
    # A 3x2 grid of 224-px patches with a hole, drawn at downsample 16 (14-px
    # cells) on a canvas sized from the slide (larger than the patches' extent).
    coords = np.array([[0, 0], [224, 0], [448, 0], [0, 224], [448, 224]])
    ids = np.array([0, 5, 5, 2, 7])
    out = tmp_path / "map.png"
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
