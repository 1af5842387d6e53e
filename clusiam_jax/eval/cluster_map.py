"""Cluster maps: each patch's cluster id painted over a slide thumbnail or mosaic.

Coordinates are level-0 pixels (top-left x, y), as in the CLAM export; the map
is drawn at ``downsample`` (level-0 pixels per map pixel). Without a thumbnail,
the canvas is sized from the slide's level-0 dimensions when known, so the map
lines up with the slide; only when they are unknown does it fall back to the
extent of the patches (largest coordinate + patch size).

``draw_export_maps`` draws one map per slide of an export (read through
export/format.py), over thumbnails found by slide id.
"""

import functools
import logging
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clusiam_jax.errors import ConfigError, DataError
from clusiam_jax.export import format as fmt

log = logging.getLogger("clusiam_jax")

THUMBNAIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")


# ---------------------------------------------------------------------- palette

def _srgb_to_lab(rgb):
    """CIELAB (D65) of sRGB colors in [0, 1], shape [..., 3]."""
    rgb = np.asarray(rgb, np.float64)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16,
                     500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], axis=-1)


@functools.lru_cache(maxsize=8)
def _palette(n):
    # Greedy farthest-point sampling in CIELAB over a grid of sRGB colors: each
    # new color is the candidate farthest (perceptually) from all chosen ones,
    # which spreads 100+ colors far better than stepping hues. Very dark and
    # very light candidates are excluded so every color shows over white
    # background and pale tissue alike. Deterministic: no randomness.
    levels = np.linspace(0.0, 1.0, 18)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    lab = _srgb_to_lab(grid)
    keep = (lab[:, 0] > 25) & (lab[:, 0] < 90)
    grid, lab = grid[keep], lab[keep]
    chosen = [int(np.argmax(np.hypot(lab[:, 1], lab[:, 2])))]  # most saturated first
    dist = np.linalg.norm(lab - lab[chosen[0]], axis=1)
    for _ in range(1, min(n, grid.shape[0])):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(lab - lab[nxt], axis=1))
    colors = np.round(grid[chosen] * 255).astype(np.uint8)
    colors.setflags(write=False)
    return colors


def cluster_palette(n=128):
    """[n, 3] uint8 colors, pairwise distinct and perceptually spread.

    Cluster id c gets ``cluster_palette(K)[c % K]``; the first colors are the
    most distinct, so a few clusters get very different colors.
    """
    return np.array(_palette(int(n)))


# ---------------------------------------------------------------------- drawing

def _cell_bounds(coords, patch_size, downsample):
    """Map-pixel [x0, x1) x [y0, y1) of each patch; floor keeps neighbours gap-free."""
    coords = np.asarray(coords, np.float64)
    start = np.floor(coords / downsample).astype(np.int64)
    end = np.floor((coords + patch_size) / downsample).astype(np.int64)
    return start, np.maximum(end, start + 1)   # at least one pixel per patch


def _legend(ids, counts, colors, height, row_height=16, pad=6):
    """A white panel listing "id: count" next to each cluster's color swatch."""
    font = ImageFont.load_default()
    rows_per_column = max(1, (height - 2 * pad) // row_height)
    columns = math.ceil(len(ids) / rows_per_column)
    column_width = 14 + 8 * (len(str(int(max(ids)))) + len(str(int(max(counts)))) + 2) + 12
    panel = Image.new("RGB", (columns * column_width + pad, height), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for i, (cid, count, color) in enumerate(zip(ids, counts, colors)):
        x = pad + (i // rows_per_column) * column_width
        y = pad + (i % rows_per_column) * row_height
        draw.rectangle([x, y + 2, x + 11, y + 13], fill=tuple(int(v) for v in color),
                       outline=(0, 0, 0))
        draw.text((x + 16, y + 1), f"{int(cid)}: {int(count)}", fill=(0, 0, 0), font=font)
    return np.asarray(panel)


def draw_cluster_map(coords, cluster_ids, patch_size, thumbnail=None, downsample=None,
                     slide_dimensions=None, alpha=0.5, background=(255, 255, 255),
                     num_clusters=None, legend=True, max_side=2048, out_path=None):
    """Paints every patch's cell in its cluster's color; returns the RGB image.

    Args:
      coords: [N, 2] level-0 top-left (x, y) of each patch.
      cluster_ids: [N] non-negative ints.
      patch_size: patch side in level-0 pixels.
      thumbnail: optional slide thumbnail (PIL image or [H, W, 3] array); the
        colors are alpha-blended over it.
      downsample: level-0 pixels per map pixel. With a thumbnail and no value,
        it is slide_dimensions[0] / thumbnail width. Without a thumbnail and no
        value, it is chosen so the longest canvas side is at most ``max_side``
        (never below 1).
      slide_dimensions: level-0 (width, height) of the slide; sizes the mosaic
        canvas when no thumbnail is given.
      alpha: color weight in the blend ``(1 - alpha) * under + alpha * color``.
      background: mosaic canvas color (no thumbnail).
      num_clusters: palette size K (default: max id + 1, at least 1); cluster c
        gets palette color c % K of ``cluster_palette(max(K, 128))``.
      legend: append a panel on the right with each cluster's color, id and
        patch count; the map itself keeps its pixel coordinates at the left.
      out_path: if given, the image is saved there as PNG.

    Returns:
      uint8 array [H, W (+ legend width), 3]. Patches that overlap are painted
      in order, the later one on top.
    """
    coords = np.asarray(coords)
    cluster_ids = np.asarray(cluster_ids).astype(np.int64)
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] != cluster_ids.shape[0]:
        raise ValueError(f"coords {coords.shape} must be [N, 2] with N = {cluster_ids.shape[0]}")
    if cluster_ids.size and cluster_ids.min() < 0:
        raise ValueError("cluster ids must be non-negative")

    if thumbnail is not None:
        if not isinstance(thumbnail, Image.Image):
            thumbnail = Image.fromarray(np.asarray(thumbnail))
        base = np.asarray(thumbnail.convert("RGB"))
        if downsample is None:
            # From the width; thumbnails round their sides, so x and y
            # downsamples differ by under a pixel's worth.
            if slide_dimensions is None:
                raise ValueError("a thumbnail needs downsample or slide_dimensions")
            downsample = slide_dimensions[0] / base.shape[1]
    else:
        if slide_dimensions is not None:
            extent = np.asarray(slide_dimensions, np.float64)
        elif coords.size:
            extent = coords.max(axis=0).astype(np.float64) + patch_size
        else:
            extent = np.array([patch_size, patch_size], np.float64)
        if downsample is None:
            downsample = max(1.0, float(extent.max()) / max_side)
        width, height = (int(math.ceil(v / downsample)) for v in extent)
        base = np.empty((height, width, 3), np.uint8)
        base[:] = np.asarray(background, np.uint8)

    height, width = base.shape[:2]
    k = int(num_clusters) if num_clusters else int(cluster_ids.max(initial=0)) + 1
    palette = cluster_palette(max(k, 128))[:k]

    # Label image first (-1 = no patch), then one vectorized blend.
    label = np.full((height, width), -1, np.int64)
    start, end = _cell_bounds(coords, patch_size, downsample)
    for (x0, y0), (x1, y1), cid in zip(start, end, cluster_ids):
        label[max(y0, 0):min(y1, height), max(x0, 0):min(x1, width)] = cid % k
    painted = label >= 0
    image = base.copy()
    under = base[painted].astype(np.float64)
    image[painted] = np.round((1 - alpha) * under
                              + alpha * palette[label[painted]]).astype(np.uint8)

    if legend and cluster_ids.size:
        ids, counts = np.unique(cluster_ids, return_counts=True)
        panel = _legend(ids, counts, palette[ids % k], height=max(height, 64))
        if panel.shape[0] > height:   # tiny maps: extend with background below
            pad = np.empty((panel.shape[0] - height, width, 3), np.uint8)
            pad[:] = np.asarray(background, np.uint8)
            image = np.concatenate([image, pad], axis=0)
        image = np.concatenate([image, panel], axis=1)

    if out_path is not None:
        Image.fromarray(image).save(out_path, format="PNG")
    return image


# -------------------------------------------------------------------- over an export

def check_thumbnail(thumbnail, n_slides):
    """ConfigError when `thumbnail` cannot serve `n_slides` slides: missing, or one file
    for several slides (checked before an export embeds anything)."""
    if not thumbnail:
        return
    if not os.path.exists(thumbnail):
        raise ConfigError(f"thumbnail not found: {thumbnail}")
    if os.path.isfile(thumbnail) and n_slides > 1:
        raise ConfigError(f"export.thumbnail {thumbnail} is one file but the export has "
                          f"{n_slides} slides: give a folder of <slide_id>.png thumbnails")


def find_thumbnail(thumbnail, slide_id, n_slides):
    """The thumbnail file for a slide: `thumbnail` itself when it is a file (only for
    a one-slide export), else `<thumbnail>/<slide_id>[_thumb].<ext>`; None if absent."""
    if not thumbnail:
        return None
    check_thumbnail(thumbnail, n_slides)
    if os.path.isfile(thumbnail):
        return thumbnail
    for stem in (slide_id, slide_id + "_thumb"):
        for ext in THUMBNAIL_EXTENSIONS:
            path = os.path.join(thumbnail, stem + ext)
            if os.path.isfile(path):
                return path
    return None


def _open_thumbnail(path, downsample):
    if not downsample or downsample <= 0:
        raise ConfigError("a thumbnail needs its downsample (level-0 pixels per thumbnail "
                          "pixel: export.thumbnail_downsample, or --downsample)")
    try:
        return Image.open(path).convert("RGB")
    except OSError as e:  # PIL's UnidentifiedImageError is one
        raise DataError(f"thumbnail {path} is not a readable image ({e})") from None


def draw_export_maps(out_dir, thumbnail=None, downsample=None):
    """Draws `<out_dir>/cluster_maps/<slide>.png` for every slide with coordinates and
    cluster ids; returns the written paths. Over the slide's thumbnail when one is found
    (then `downsample`, level-0 pixels per thumbnail pixel, is required), else over a
    white mosaic canvas."""
    if downsample is not None and downsample < 0:
        raise ConfigError(f"the thumbnail downsample must be positive; got {downsample}")
    rows = fmt.read_export_manifest(out_dir)
    data = fmt.read_export(out_dir)
    written = []
    for row in rows:
        arrays = data[row["slide_id"]]
        if "cluster_ids" not in arrays:
            log.info("cluster maps: the model has no cluster head; nothing to draw")
            return written
        coords, ids = arrays["coords"], arrays["cluster_ids"]
        known = np.all(coords >= 0, axis=1)
        if not known.any():
            log.warning("cluster maps: slide %s has no patch coordinates; skipped",
                        row["slide_id"])
            continue
        thumb_path = find_thumbnail(thumbnail, row["slide_id"], len(rows))
        thumb = _open_thumbnail(thumb_path, downsample) if thumb_path else None
        k = arrays["cluster_logits"].shape[1] if "cluster_logits" in arrays else None
        path = fmt.map_file(out_dir, row)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with fmt.atomic_write(path) as tmp:
            draw_cluster_map(coords[known], ids[known], arrays.get("patch_size") or 224,
                             thumbnail=thumb, downsample=downsample if thumb else None,
                             num_clusters=k, out_path=tmp)
        written.append(path)
    return written
