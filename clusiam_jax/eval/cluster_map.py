"""Cluster maps: each patch's cluster id painted over a slide thumbnail or mosaic.

Coordinates are level-0 pixels (top-left x, y), as in the CLAM export; the map
is drawn at ``downsample`` (level-0 pixels per map pixel). Without a thumbnail,
the canvas is sized from the slide's level-0 dimensions when known, so the map
lines up with the slide; only when they are unknown does it fall back to the
extent of the patches (largest coordinate + patch size).

Colors (``cluster_palette``) are chosen for K up to 100 and more: greedy farthest
points in CIEDE2000 over an sRGB grid, away from H&E's own colors and hues, so no two
clusters look alike and no overlay reads as stain.

A map may carry a title band above it (its font grows with the map, as does the
legend's, so both read on a 2048-px map shown on a screen) and a legend on its
right, clusters in decreasing share of the map's patches; the map keeps its own pixel
coordinates, shifted down by ``header_height(...)`` rows when titled.

``draw_export_maps`` draws one map per slide of an export (read through
export/format.py): over a thumbnail found by slide id, else over the slide the
export was made from (read through slides/reader.py), else, for patch exports,
over a white mosaic canvas. Each PNG records what it was drawn over (text key
``clusiam_background``) so that a mosaic map never replaces one drawn over a
slide or thumbnail.
"""

import functools
import json
import logging
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from clusiam_jax.errors import ConfigError, DataError
from clusiam_jax.export import format as fmt

log = logging.getLogger('clusiam_jax')

THUMBNAIL_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.webp')
# PNG text key recording what a map was drawn over, and its values.
BACKGROUND_KEY = 'clusiam_background'
BACKGROUNDS = ('slide', 'thumbnail', 'mosaic')
# A mosaic map that would replace one drawn over a slide or thumbnail goes here instead.
MOSAIC_SUFFIX = '.mosaic.png'
LEGEND_HEADER = 'cluster: patches (share)'


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


def delta_e_2000(lab1, lab2):
    """CIEDE2000 color difference between CIELAB colors (broadcast, shape [..., 3]).

    Unlike the Euclidean CIE76 distance, it does not overrate differences among
    saturated blues (where CIE76 calls three blues "far apart") nor underrate those among
    dark and light ones; about 2 is a just noticeable difference and 10 or more reads as
    another color at a glance (Sharma, Wu & Dalal 2005, whose test pairs it matches)."""
    lab1, lab2 = np.broadcast_arrays(np.asarray(lab1, np.float64), np.asarray(lab2, np.float64))
    l1, a1, b1 = np.moveaxis(lab1, -1, 0)
    l2, a2, b2 = np.moveaxis(lab2, -1, 0)
    c7 = ((np.hypot(a1, b1) + np.hypot(a2, b2)) / 2) ** 7
    g = 0.5 * (1 - np.sqrt(c7 / (c7 + 25.0 ** 7)))
    a1, a2 = (1 + g) * a1, (1 + g) * a2
    c1, c2 = np.hypot(a1, b1), np.hypot(a2, b2)
    h1, h2 = np.degrees(np.arctan2(b1, a1)) % 360, np.degrees(np.arctan2(b2, a2)) % 360
    grey = c1 * c2 == 0
    dh = h2 - h1
    dh = np.where(grey, 0, np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh)))
    d_hue = 2 * np.sqrt(c1 * c2) * np.sin(np.radians(dh) / 2)
    l_mean, c_mean, h_sum = (l1 + l2) / 2, (c1 + c2) / 2, h1 + h2
    h_mean = np.where(grey, h_sum, np.where(np.abs(h1 - h2) > 180,
                                           np.where(h_sum < 360, h_sum + 360, h_sum - 360),
                                           h_sum) / 2)
    t = (1 - 0.17 * np.cos(np.radians(h_mean - 30)) + 0.24 * np.cos(np.radians(2 * h_mean))
         + 0.32 * np.cos(np.radians(3 * h_mean + 6))
         - 0.20 * np.cos(np.radians(4 * h_mean - 63)))
    c_mean7 = c_mean ** 7
    r_t = (-np.sin(np.radians(60 * np.exp(-(((h_mean - 275) / 25) ** 2))))
           * 2 * np.sqrt(c_mean7 / (c_mean7 + 25.0 ** 7)))
    s_l = 1 + 0.015 * (l_mean - 50) ** 2 / np.sqrt(20 + (l_mean - 50) ** 2)
    s_c, s_h = 1 + 0.045 * c_mean, 1 + 0.015 * c_mean * t
    d_l, d_c, d_h = (l2 - l1) / s_l, (c2 - c1) / s_c, d_hue / s_h
    return np.sqrt(d_l ** 2 + d_c ** 2 + d_h ** 2 + r_t * d_c * d_h)


# What a cluster color must stay away from: H&E itself, so an overlay never reads as
# stain. Haematoxylin (nuclei: blue-purple, dark and typical), eosin (stroma, cytoplasm:
# pink, deep and typical), their mixture (lavender), pale eosin and the white glass.
HE_REFERENCES = np.array([[80, 60, 140], [50, 30, 100], [230, 150, 190], [200, 100, 170],
                          [160, 110, 170], [245, 215, 235], [255, 255, 255]], np.uint8)
# The least CIEDE2000 difference between a cluster color and every H&E reference color.
HE_MIN_DELTA_E = 20.0
# CIELAB hue angles (degrees) no cluster color has: H&E's own, purple to pink (its
# references lie at 305-347 degrees), with a margin of about 20. A raspberry or magenta
# overlay differs enough from the stain's colors, yet blended over eosin it reads as
# darker eosin, and a pathologist cannot tell a painted patch from a bare one.
HE_HUES = (285.0, 20.0)
# Candidates: an 18-level sRGB grid (5832 colors), neither too dark nor too light to show
# over tissue and white (CIELAB L* in (30, 88)), and not greyish (chroma above 30: a grey
# overlay reads as "no cluster").
_GRID_LEVELS, _LIGHTNESS, _MIN_CHROMA = 18, (30.0, 88.0), 30.0


def in_he_hues(lab):
    """bool [...]: whether CIELAB colors have a hue of H&E (HE_HUES)."""
    hue = np.degrees(np.arctan2(lab[..., 2], lab[..., 1])) % 360
    return (hue >= HE_HUES[0]) | (hue < HE_HUES[1])


@functools.lru_cache(maxsize=8)
def _palette(n):
    # Greedy farthest-point selection in CIEDE2000 over the candidates: each new color is
    # the candidate farthest (perceptually) from all the chosen ones and from the H&E
    # references, which start as "chosen". Deterministic (no randomness, ties to the first
    # candidate), and a prefix of a longer palette is the shorter palette.
    levels = np.linspace(0.0, 1.0, _GRID_LEVELS)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing='ij'), -1).reshape(-1, 3)
    lab = _srgb_to_lab(grid)
    to_stain = delta_e_2000(lab[:, None], _srgb_to_lab(HE_REFERENCES / 255.0)[None]).min(1)
    keep = ((lab[:, 0] > _LIGHTNESS[0]) & (lab[:, 0] < _LIGHTNESS[1])
            & (np.hypot(lab[:, 1], lab[:, 2]) > _MIN_CHROMA) & (to_stain > HE_MIN_DELTA_E)
            & ~in_he_hues(lab))
    grid, lab, dist = grid[keep], lab[keep], to_stain[keep]
    chosen = []
    for _ in range(min(n, grid.shape[0])):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, delta_e_2000(lab, lab[nxt]))
    colors = np.round(grid[chosen] * 255).astype(np.uint8)
    if len(colors) < n:   # more clusters than candidates: colors repeat
        colors = np.resize(colors, (n, 3))
    colors.setflags(write=False)
    return colors


def cluster_palette(n=128):
    """[n, 3] uint8 colors, pairwise distinct and away from H&E, computed once per n.

    Cluster id c gets ``cluster_palette(K)[c % K]``; the first colors are the most
    distinct (a prefix of a longer palette is the shorter one), so a few clusters get
    very different colors. None has a hue of H&E (HE_HUES), each differs by more than
    HE_MIN_DELTA_E from every HE_REFERENCES color. A fixed Glasbey palette spreads its
    colors about as well but puts some of them on H&E's own pinks and purples, which is
    why the palette is chosen here; tests/test_eval_cluster_map.py holds the bounds.
    """
    return np.array(_palette(int(n)))


# ---------------------------------------------------------------------- drawing

def _cell_bounds(coords, patch_size, downsample):
    """Map-pixel [x0, x1) x [y0, y1) of each patch; floor keeps neighbours gap-free."""
    coords = np.asarray(coords, np.float64)
    start = np.floor(coords / downsample).astype(np.int64)
    end = np.floor((coords + patch_size) / downsample).astype(np.int64)
    return start, np.maximum(end, start + 1)   # at least one pixel per patch


def legend_font_size(map_height):
    """The legend's font size (px) for a map ``map_height`` px high: 11 up to ~690 px,
    then growing with the map (34 at 2048 px, so it reads when the map is shown
    scaled down to a screen), at most 40."""
    return int(np.clip(round(map_height / 60), 11, 40))


def title_font_size(map_height, map_width):
    """The title's font size (px): 12 on small maps, then ``longest side / 48``
    (43 on a 2048-px map), at most 48."""
    return int(np.clip(round(max(map_height, map_width) / 48), 12, 48))


def header_height(map_height, map_width, title):
    """Rows of the title band above a ``map_height`` x ``map_width`` map: the map (and
    its legend) start at this row of the image; 0 without a title."""
    if not title:
        return 0
    return int(round(1.8 * title_font_size(map_height, map_width)))


def _title_band(title, width, map_height, map_width):
    """A white band with the title in black, at least ``width`` wide (wider when the
    title does not fit at the smallest font), with a grey rule at its bottom."""
    height = header_height(map_height, map_width, title)
    size = title_font_size(map_height, map_width)
    margin = max(6, size // 2)
    font = ImageFont.load_default(size=size)
    length = font.getlength(title)
    if length + 2 * margin > width and size > 12:   # shrink to fit, down to 12 px
        size = max(12, int(size * (width - 2 * margin) / length))
        font = ImageFont.load_default(size=size)
        length = font.getlength(title)
    band = Image.new('RGB', (max(width, int(math.ceil(length)) + 2 * margin), height),
                     (255, 255, 255))
    draw = ImageDraw.Draw(band)
    draw.text((margin, height // 2), title, fill=(0, 0, 0), font=font, anchor='lm')
    draw.line([(0, height - 1), (band.width - 1, height - 1)], fill=(190, 190, 190))
    return np.asarray(band)


def share_text(count, total):
    """A share as a legend or atlas shows it: `45%`, `4.5%`, `0.3%`, `<0.1%`."""
    share = 100.0 * count / max(total, 1)
    if share >= 10 or share == 0:
        return f'{share:.0f}%'
    return f'{share:.1f}%' if share >= 0.05 else '<0.1%'


def legend_order(ids, counts):
    """The legend's order of (ids, counts): decreasing patch count (share), ties by id,
    so the few clusters covering most of a slide come first, not among 1-patch ones."""
    ids, counts = np.asarray(ids), np.asarray(counts)
    order = np.lexsort((ids, -counts))
    return ids[order], counts[order]


def _legend(ids, counts, colors, map_height):
    """A white panel: a "cluster: patches (share)" header over each column, then one row
    per cluster, in the order given, with its color swatch, id, patch count and share of
    the slide's patches; font and rows scale with the map's height. At least as high as
    the map, and high enough for 16 rows (or all)."""
    size = legend_font_size(map_height)
    font = ImageFont.load_default(size=size)
    row = int(round(1.5 * size))
    pad, gap = max(6, size // 2), max(4, size // 3)
    total = int(np.sum(counts))
    labels = [f'{int(cid)}: {int(count)} ({share_text(count, total)})'
              for cid, count in zip(ids, counts)]
    entry = size + gap + max(font.getlength(text) for text in labels)
    column_width = int(math.ceil(max(entry, font.getlength(LEGEND_HEADER)))) + 2 * gap
    height = max(map_height, 2 * pad + row * (1 + min(len(ids), 16)))
    per_column = max(1, (height - 2 * pad) // row - 1)   # the header takes one row
    columns = math.ceil(len(ids) / per_column)
    panel = Image.new('RGB', (pad + columns * column_width, height), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for column in range(columns):
        draw.text((pad + column * column_width, pad + row // 2), LEGEND_HEADER,
                  fill=(0, 0, 0), font=font, anchor='lm')
    for i, (text, color) in enumerate(zip(labels, colors)):
        x = pad + (i // per_column) * column_width
        y = pad + (1 + i % per_column) * row
        top = y + (row - size) // 2
        draw.rectangle([x, top, x + size - 1, top + size - 1],
                       fill=tuple(int(v) for v in color), outline=(0, 0, 0))
        draw.text((x + size + gap, y + row // 2), text, fill=(0, 0, 0), font=font,
                  anchor='lm')
    return np.asarray(panel)


def save_map(image, path, text=None):
    """Saves ``image`` as PNG with ``text`` ({key: str}) as PNG text chunks."""
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, str(value))
    Image.fromarray(image).save(path, format='PNG', pnginfo=info)


def map_background(path):
    """What the map at ``path`` was drawn over ('slide', 'thumbnail' or 'mosaic', from
    its PNG text); None when unreadable or not recorded (drawn by an older version)."""
    try:
        with Image.open(path) as image:
            value = getattr(image, 'text', {}).get(BACKGROUND_KEY)
    except (OSError, ValueError, SyntaxError):
        return None
    return value if value in BACKGROUNDS else None


def draw_cluster_map(coords, cluster_ids, patch_size, thumbnail=None, downsample=None,
                     slide_dimensions=None, alpha=0.5, background=(255, 255, 255),
                     num_clusters=None, legend=True, max_side=2048, out_path=None,
                     title=None, png_text=None, annotations=None):
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
      alpha: opacity of the colors, in [0, 1]: the blend is
        ``(1 - alpha) * under + alpha * color``.
      background: mosaic canvas color (no thumbnail).
      num_clusters: palette size K (default: max id + 1, at least 1); cluster c
        gets palette color c % K of ``cluster_palette(max(K, 128))``.
      legend: append a panel on the right with a "cluster: patches (share)" header and
        each cluster's color, id, patch count and share of the map's patches, in
        decreasing share (``legend_order``); its font grows with the map's height.
      out_path: if given, the image is saved there as PNG, recording in its text
        what it was drawn over (``clusiam_background``: 'thumbnail' or 'mosaic'),
        the row the map starts at (``clusiam_map_top``) and the downsample.
      title: if given, a band with this text above the map and legend, its font
        growing with the map's size; the map then starts at row
        ``header_height(map_height, map_width, title)``.
      png_text: more PNG text for ``out_path`` ({key: str}), overriding the above.
      annotations: slides.annotations.Annotation list (level-0 polygons) whose contours
        are drawn over the colors in their class colors.

    Returns:
      uint8 array [header + H, W (+ legend width), 3]: the map at the left, below
      the title band (if any), in its own pixel coordinates. Patches that overlap
      are painted in order, the later one on top.
    """
    coords = np.asarray(coords)
    cluster_ids = np.asarray(cluster_ids).astype(np.int64)
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] != cluster_ids.shape[0]:
        raise DataError(f'coords {coords.shape} must be [N, 2] with N = {cluster_ids.shape[0]} '
                        f'(one row per cluster id)')
    if cluster_ids.size and cluster_ids.min() < 0:
        raise DataError(f'cluster ids must be non-negative; got {int(cluster_ids.min())}')
    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"the cluster map's alpha (opacity of the colors) must be in "
                          f"[0, 1]; got {alpha}")

    if thumbnail is not None:
        if not isinstance(thumbnail, Image.Image):
            thumbnail = Image.fromarray(np.asarray(thumbnail))
        base = np.asarray(thumbnail.convert('RGB'))
        if downsample is None:
            # From the width; thumbnails round their sides, so x and y
            # downsamples differ by under a pixel's worth.
            if slide_dimensions is None:
                raise ConfigError("a thumbnail needs its downsample (level-0 pixels per "
                                  "thumbnail pixel) or the slide's level-0 dimensions")
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
    if annotations:
        from clusiam_jax.slides.annotations import draw_contours
        image = draw_contours(image, annotations, downsample)

    if legend and cluster_ids.size:
        ids, counts = legend_order(*np.unique(cluster_ids, return_counts=True))
        panel = _legend(ids, counts, palette[ids % k], map_height=height)
        if panel.shape[0] > height:   # short maps: extend with background below
            pad = np.empty((panel.shape[0] - height, width, 3), np.uint8)
            pad[:] = np.asarray(background, np.uint8)
            image = np.concatenate([image, pad], axis=0)
        image = np.concatenate([image, panel], axis=1)

    top = 0
    if title:
        band = _title_band(str(title), image.shape[1], height, width)
        if band.shape[1] > image.shape[1]:   # a long title: widen with white on the right
            right = np.full((image.shape[0], band.shape[1] - image.shape[1], 3), 255, np.uint8)
            image = np.concatenate([image, right], axis=1)
        top = band.shape[0]
        image = np.concatenate([band, image], axis=0)

    if out_path is not None:
        text = {BACKGROUND_KEY: 'thumbnail' if thumbnail is not None else 'mosaic',
                'clusiam_map_top': top, 'clusiam_downsample': repr(float(downsample))}
        if title:
            text['Title'] = str(title)
        save_map(image, out_path, dict(text, **(png_text or {})))
    return image


# -------------------------------------------------------------------- over an export

def check_thumbnail(thumbnail, n_slides):
    """ConfigError when `thumbnail` cannot serve `n_slides` slides: missing, or one file
    for several slides (checked before an export embeds anything)."""
    if not thumbnail:
        return
    if not os.path.exists(thumbnail):
        raise ConfigError(f'thumbnail not found: {thumbnail}')
    if os.path.isfile(thumbnail) and n_slides > 1:
        raise ConfigError(f'export.thumbnail {thumbnail} is one file but the export has '
                          f'{n_slides} slides: give a folder of <slide_id>.png thumbnails')


def find_thumbnail(thumbnail, slide_id, n_slides):
    """The thumbnail file for a slide: `thumbnail` itself when it is a file (only for
    a one-slide export), else `<thumbnail>/<slide_id>[_thumb].<ext>`; None if absent."""
    if not thumbnail:
        return None
    check_thumbnail(thumbnail, n_slides)
    if os.path.isfile(thumbnail):
        return thumbnail
    for stem in (slide_id, slide_id + '_thumb'):
        for ext in THUMBNAIL_EXTENSIONS:
            path = os.path.join(thumbnail, stem + ext)
            if os.path.isfile(path):
                return path
    return None


def _open_thumbnail(path, downsample):
    if not downsample or downsample <= 0:
        raise ConfigError('a thumbnail needs its downsample (level-0 pixels per thumbnail '
                          'pixel: export.thumbnail_downsample, or --downsample)')
    try:
        return Image.open(path).convert('RGB')
    except OSError as e:  # PIL's UnidentifiedImageError is one
        raise DataError(f'thumbnail {path} is not a readable image ({e})') from None


def _slide_thumbnail(slide_id, path, dimensions, max_side):
    """(thumbnail, downsample) of the slide an export was made from, its longest side at
    most `max_side`; DataError naming the slide, the file and the fix when unreadable."""
    import openslide

    from clusiam_jax.slides import reader, tiles
    fix = (f'move the slide back to {path}, or give its thumbnail and downsample '
           f'(export.thumbnail and export.thumbnail_downsample, or maps --thumbnail and '
           f'--downsample)')
    try:
        slide = reader.open_slide(path)
    except DataError as e:
        raise DataError(f'cluster map of slide {slide_id}: cannot read the slide it was '
                        f'exported from ({e}); {fix}') from None
    try:
        if dimensions is not None and tuple(slide.dimensions) != tuple(dimensions):
            raise DataError(
                f'cluster map of slide {slide_id}: {path} is {slide.dimensions[0]} x '
                f'{slide.dimensions[1]} px but the export was made from a {dimensions[0]} x '
                f'{dimensions[1]} px slide (another file under that name?); {fix}')
        with tiles.opened(path, slide) as direct:   # an OME-TIFF's hidden levels
            return reader.thumbnail_for_side(slide, max_side, direct)
    except openslide.OpenSlideError as e:
        raise DataError(f"cluster map of slide {slide_id}: reading {path} failed "
                        f"({' '.join(str(e).split())}); {fix}") from None
    finally:
        slide.close()


def read_export_info(out_dir):
    """The export's export_info.json as a dict; {} when missing or unreadable."""
    path = os.path.join(out_dir, fmt.INFO_NAME)
    try:
        with open(path) as f:
            info = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning('cluster maps: %s is unreadable (%s); titles omit the run and step',
                    path, e)
        return {}
    return info if isinstance(info, dict) else {}


def map_title(slide_id, step=None, num_clusters=None, workdir=None):
    """The map's title, `<slide> · step <step> · K=<K> · run <workdir name>`, leaving
    out what is unknown."""
    parts = [str(slide_id)]
    if step is not None:
        parts.append(f'step {step}')
    if num_clusters:
        parts.append(f'K={num_clusters}')
    if workdir:
        parts.append(f'run {os.path.basename(os.path.normpath(str(workdir)))}')
    return ' · '.join(parts)


def mosaic_path(path):
    """Where a map drawn over the mosaic canvas goes: `path`, unless a map there was drawn
    over a slide or thumbnail (or by an older version that did not record how), which
    is kept: then `<stem>.mosaic.png` next to it, with a warning."""
    if not os.path.exists(path):
        return path
    drawn_over = map_background(path)
    if drawn_over == 'mosaic':
        return path
    other = os.path.splitext(path)[0] + MOSAIC_SUFFIX
    how = (f'over its {drawn_over}' if drawn_over else
           'by an older version that did not record over what')
    log.warning('cluster maps: %s was drawn %s and is kept; the map without a thumbnail '
                'goes to %s (give the thumbnail, or the slide, to redraw it)', path, how, other)
    return other


def _slide_annotations(folder, slide_id):
    """The slide's annotations from `folder` (None when no folder or no file for it)."""
    if not folder:
        return None
    from clusiam_jax.slides import annotations
    path = annotations.find_annotation_file(folder, slide_id)
    if path is None:
        log.info('cluster maps: no annotation file for %s in %s', slide_id, folder)
        return None
    return annotations.read_annotations(path)


def write_export_geojson(out_dir):
    """`<out_dir>/qupath/<slide>.geojson` for every slide with coordinates and cluster
    ids: each patch a QuPath tile classified `cluster c` in its map color, so a
    pathologist opens the clusters in QuPath (File > Import objects). Returns the paths."""
    from clusiam_jax.slides.annotations import write_cluster_geojson
    written = []
    data = fmt.read_export(out_dir)
    for row in fmt.read_export_manifest(out_dir):
        arrays = data[row['slide_id']]
        if 'cluster_ids' not in arrays:
            log.info('qupath: the model has no cluster head; nothing to write')
            return written
        known = np.all(arrays['coords'] >= 0, axis=1)
        if not known.any():
            log.warning('qupath: slide %s has no patch coordinates; skipped', row['slide_id'])
            continue
        k = (arrays['cluster_logits'].shape[1] if 'cluster_logits' in arrays
             else int(arrays['cluster_ids'].max()) + 1)
        path = os.path.join(out_dir, fmt.QUPATH_DIR,
                            fmt.slide_file_name(row['slide_id']) + '.geojson')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_cluster_geojson(path, arrays['coords'][known], arrays.get('patch_size') or 224,
                              arrays['cluster_ids'][known], cluster_palette(max(k, 128))[:k],
                              row['slide_id'])
        written.append(path)
    return written


def draw_export_maps(out_dir, thumbnail=None, downsample=None, alpha=0.5, max_side=2048,
                     annotations=None):
    """Draws `<out_dir>/cluster_maps/<slide>.png` for every slide with coordinates and
    cluster ids; returns the written paths.

    Each map is drawn over, in this order: the slide's thumbnail file when one is found
    in `thumbnail` (then `downsample`, level-0 pixels per thumbnail pixel, is required);
    else, for exports made from whole slides (`slide_path`), the slide's own thumbnail
    read at at most `max_side` px (DataError when the slide is gone or unreadable, never
    a blank canvas); else (patch exports) a white mosaic canvas. `alpha` is the colors'
    opacity. The title names the slide, the checkpoint step, K and the run (from
    export_info.json). A mosaic map never replaces one drawn over a slide or thumbnail:
    it goes to `<stem>.mosaic.png` next to it (see `mosaic_path`). `annotations`: a
    folder of `<slide_id>.geojson|.json|.xml` (QuPath GeoJSON, ASAP XML) whose contours
    are drawn on the map of their slide.
    """
    if annotations and not os.path.isdir(annotations):
        raise ConfigError(f'annotations folder not found: {annotations}')
    if downsample is not None and downsample <= 0:
        raise ConfigError(f'the thumbnail downsample must be positive; got {downsample}')
    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"the cluster map's alpha (opacity of the colors) must be in "
                          f"[0, 1]; got {alpha}")
    if int(max_side) < 16:
        raise ConfigError(f"the cluster map's max_side must be at least 16 px; got {max_side}")
    rows = fmt.read_export_manifest(out_dir)
    data = fmt.read_export(out_dir)
    info = read_export_info(out_dir)
    written = []
    for row in rows:
        slide_id = row['slide_id']
        arrays = data[slide_id]
        if 'cluster_ids' not in arrays:
            log.info('cluster maps: the model has no cluster head; nothing to draw')
            return written
        coords, ids = arrays['coords'], arrays['cluster_ids']
        known = np.all(coords >= 0, axis=1)
        if not known.any():
            log.warning('cluster maps: slide %s has no patch coordinates; skipped', slide_id)
            continue
        k = arrays['cluster_logits'].shape[1] if 'cluster_logits' in arrays else None
        thumb_path = find_thumbnail(thumbnail, slide_id, len(rows))
        dimensions = arrays.get('level0_dimensions')
        thumb, scale, drawn_over = None, None, 'mosaic'
        if thumb_path:
            thumb, scale = _open_thumbnail(thumb_path, downsample), downsample
            drawn_over = 'thumbnail'
        elif arrays.get('slide_path'):
            thumb, scale = _slide_thumbnail(slide_id, arrays['slide_path'], dimensions,
                                            int(max_side))
            drawn_over = 'slide'
        path = fmt.map_file(out_dir, row)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if drawn_over == 'mosaic':
            path = mosaic_path(path)
        title = map_title(slide_id, info.get('checkpoint_step'),
                          k or int(ids[known].max()) + 1, info.get('workdir'))
        contours = _slide_annotations(annotations, slide_id)
        with fmt.atomic_write(path) as tmp:
            draw_cluster_map(coords[known], ids[known], arrays.get('patch_size') or 224,
                             thumbnail=thumb, downsample=scale, slide_dimensions=dimensions,
                             alpha=alpha, num_clusters=k, max_side=int(max_side),
                             out_path=tmp, title=title,
                             png_text={BACKGROUND_KEY: drawn_over}, annotations=contours)
        written.append(path)
    return written
