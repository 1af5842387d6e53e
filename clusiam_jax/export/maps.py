"""Cluster maps: each patch's cluster painted over a slide thumbnail or a mosaic canvas, with a
title band and a legend; each PNG records what it was drawn over (a mosaic never replaces it).
QuPath tiles (export.qupath): `<export>/qupath/<slide>.geojson`, each patch a tile classified
`cluster c` in its map color, in level-0 pixels (QuPath: File > Import objects)."""
import contextlib
import io
import json
import logging
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from clusiam_jax import storage
from clusiam_jax.errors import ConfigError, DataError
from clusiam_jax.export import format as fmt
from clusiam_jax.export.palette import palette_for
from clusiam_jax.fileio import atomic_write
from clusiam_jax.slides import annotations as ann_lib
from clusiam_jax.slides import coords as coords_lib
from clusiam_jax.slides import reader

log = logging.getLogger('clusiam_jax')

THUMBNAIL_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.webp')
BACKGROUND_KEY = 'clusiam_background'
BACKGROUNDS = ('slide', 'thumbnail', 'mosaic')
MOSAIC_SUFFIX = '.mosaic.png'
LEGEND_HEADER = 'cluster: patches (share)'


def legend_font_size(map_height):
    return int(np.clip(round(map_height / 60), 11, 40))


def title_font_size(map_height, map_width):
    return int(np.clip(round(max(map_height, map_width) / 48), 12, 48))


def header_height(map_height, map_width, title):
    """Rows of the title band above the map: the map starts at this row; 0 untitled."""
    return int(round(1.8 * title_font_size(map_height, map_width))) if title else 0


def _title_band(title, width, map_height, map_width):
    """The title over a grey rule, at least `width` wide (wider if 12 px does not fit)."""
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
    """(ids, counts) by decreasing count, ties by id."""
    ids, counts = np.asarray(ids), np.asarray(counts)
    order = np.lexsort((ids, -counts))
    return ids[order], counts[order]


def _legend(ids, counts, colors, map_height):
    """Per cluster its swatch, id, patch count and share, in columns of at least 16 rows."""
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
        draw.text((x + size + gap, y + row // 2), text, fill=(0, 0, 0), font=font, anchor='lm')
    return np.asarray(panel)


def map_background(path):
    """What the map at `path` was drawn over (BACKGROUNDS); None if unknown."""
    try:
        with Image.open(io.BytesIO(storage.read_bytes(path)) if storage.is_url(path)
                        else path) as image:
            value = getattr(image, 'text', {}).get(BACKGROUND_KEY)
    except (OSError, ValueError, SyntaxError, DataError):
        return None
    return value if value in BACKGROUNDS else None


def _check_alpha(alpha):
    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"the cluster map's alpha (opacity of the colors) must be in "
                          f'[0, 1]; got {alpha}')


def draw_cluster_map(coords, cluster_ids, patch_size, thumbnail=None, downsample=None,
                     slide_dimensions=None, alpha=0.5, background=(255, 255, 255),
                     num_clusters=None, legend=True, max_side=2048, out_path=None,
                     title=None, png_text=None, annotations=None):
    """uint8 RGB: each patch's cell blended with its color over `thumbnail` or a canvas."""
    coords = np.asarray(coords, np.float64)
    cluster_ids = np.asarray(cluster_ids).astype(np.int64)
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] != cluster_ids.shape[0]:
        raise DataError(f'coords {coords.shape} must be [N, 2] with N = {cluster_ids.shape[0]} '
                        f'(one row per cluster id)')
    if cluster_ids.size and cluster_ids.min() < 0:
        raise DataError(f'cluster ids must be non-negative; got {int(cluster_ids.min())}')
    _check_alpha(alpha)

    if thumbnail is not None:
        if not isinstance(thumbnail, Image.Image):
            thumbnail = Image.fromarray(np.asarray(thumbnail))
        base = np.asarray(thumbnail.convert('RGB'))
        if downsample is None:   # from the width: thumbnails round their sides
            if slide_dimensions is None:
                raise ConfigError("a thumbnail needs its downsample (level-0 pixels per "
                                  "thumbnail pixel) or the slide's level-0 dimensions")
            downsample = slide_dimensions[0] / base.shape[1]
    else:
        if slide_dimensions is not None:
            extent = np.asarray(slide_dimensions, np.float64)
        elif coords.size:
            extent = coords.max(axis=0) + patch_size
        else:
            extent = np.array([patch_size, patch_size], np.float64)
        if downsample is None:
            downsample = max(1.0, float(extent.max()) / max_side)
        width, height = (int(math.ceil(v / downsample)) for v in extent)
        base = np.full((height, width, 3), background, np.uint8)

    height, width = base.shape[:2]
    k = int(num_clusters) if num_clusters else int(cluster_ids.max(initial=0)) + 1
    palette = palette_for(k)
    label = np.full((height, width), -1, np.int64)   # -1: no patch; then one blend
    # Map-pixel [x0, x1) x [y0, y1), at least one pixel; floor keeps neighbours gap-free.
    start = np.floor(coords / downsample).astype(np.int64)
    end = np.maximum(np.floor((coords + patch_size) / downsample).astype(np.int64), start + 1)
    for (x0, y0), (x1, y1), cid in zip(start, end, cluster_ids):
        label[max(y0, 0):min(y1, height), max(x0, 0):min(x1, width)] = cid % k
    painted = label >= 0
    image = base.copy()
    image[painted] = np.round((1 - alpha) * base[painted].astype(np.float64)
                              + alpha * palette[label[painted]]).astype(np.uint8)
    if annotations:
        image = ann_lib.draw_contours(image, annotations, downsample)

    if legend and cluster_ids.size:
        ids, counts = legend_order(*np.unique(cluster_ids, return_counts=True))
        panel = _legend(ids, counts, palette[ids % k], map_height=height)
        if panel.shape[0] > height:   # short maps: extend with background below
            pad = np.full((panel.shape[0] - height, width, 3), background, np.uint8)
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
                'clusiam_map_top': top, 'clusiam_downsample': repr(float(downsample)),
                **({'Title': str(title)} if title else {}), **(png_text or {})}
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, str(value))
        Image.fromarray(image).save(out_path, format='PNG', pnginfo=info)
    return image


def check_thumbnail(thumbnail, n_slides):
    """ConfigError when `thumbnail` is missing, or one file for several slides."""
    if not thumbnail:
        return
    if not os.path.exists(thumbnail):
        raise ConfigError(f'thumbnail not found: {thumbnail}')
    if os.path.isfile(thumbnail) and n_slides > 1:
        raise ConfigError(f'export.thumbnail {thumbnail} is one file but the export has '
                          f'{n_slides} slides: give a folder of <slide_id>.png thumbnails')


def find_thumbnail(thumbnail, slide_id):
    """`thumbnail` if a file, else `<thumbnail>/<slide_id>[_thumb].<ext>`; None if absent."""
    if os.path.isfile(thumbnail):
        return thumbnail
    paths = (os.path.join(thumbnail, stem + ext) for stem in (slide_id, slide_id + '_thumb')
             for ext in THUMBNAIL_EXTENSIONS)
    return next((path for path in paths if os.path.isfile(path)), None)


@contextlib.contextmanager
def exported_slide(what, slide_id, path, dimensions, fix):
    """The slide an export was made from, open; DataError with `fix` if unreadable or resized."""
    import openslide
    try:
        slide = reader.open_slide(path)
    except DataError as e:
        raise DataError(f'{what}: cannot read slide {slide_id} ({e}); {fix}') from None
    with slide:
        if dimensions is not None and tuple(slide.dimensions) != tuple(dimensions):
            raise DataError(f'{what}: {path} is {slide.dimensions[0]} x {slide.dimensions[1]} '
                            f'px but slide {slide_id} was exported from a {dimensions[0]} x '
                            f'{dimensions[1]} px slide (another file under that name?); {fix}')
        try:
            yield slide
        except (openslide.OpenSlideError, ValueError) as e:   # ValueError: a damaged tile
            raise DataError(f"{what}: reading slide {slide_id} ({path}) failed "
                            f"({' '.join(str(e).split())}); {fix}") from None


def draw_export_maps(out_dir, thumbnail=None, downsample=None, alpha=0.5, max_side=2048,
                     annotations=None):
    """Paths of `<out_dir>/cluster_maps/<slide>.png`, over the thumbnail, else the slide (never
    a blank canvas when it is gone), else (patch exports) a mosaic canvas."""
    if annotations and not os.path.isdir(annotations):
        raise ConfigError(f'annotations folder not found: {annotations}')
    if downsample is not None and downsample <= 0:
        raise ConfigError(f'the thumbnail downsample must be positive; got {downsample}')
    _check_alpha(alpha)
    if int(max_side) < 16:
        raise ConfigError(f"the cluster map's max_side must be at least 16 px; got {max_side}")
    info = fmt.read_export_info(out_dir)
    check_thumbnail(thumbnail, len(fmt.read_export_manifest(out_dir)))
    run = info.get('workdir') and f"run {os.path.basename(os.path.normpath(info['workdir']))}"
    written = []
    for row, arrays, known, k in fmt.clustered_slides(out_dir, 'cluster maps'):
        slide_id = row['slide_id']
        thumb_path = thumbnail and find_thumbnail(thumbnail, slide_id)
        dimensions = arrays.get('level0_dimensions')
        thumb, scale, drawn_over = None, None, 'mosaic'
        if thumb_path:
            if not downsample:
                raise ConfigError('a thumbnail needs its downsample (level-0 pixels per thumbnail '
                                  'pixel: export.thumbnail_downsample, or --downsample)')
            try:
                thumb, scale = Image.open(thumb_path).convert('RGB'), downsample
            except OSError as e:  # PIL's UnidentifiedImageError is one
                raise DataError(f'thumbnail {thumb_path} is not a readable image ({e})') from None
            drawn_over = 'thumbnail'
        elif arrays.get('slide_path'):
            fix = (f"move the slide back to {arrays['slide_path']}, or give its thumbnail and "
                   f'downsample (export.thumbnail and export.thumbnail_downsample, or maps '
                   f'--thumbnail and --downsample)')
            with exported_slide('cluster map', slide_id, arrays['slide_path'], dimensions,
                                fix) as slide:
                thumb, scale = reader.thumbnail_for_side(slide, int(max_side))
            drawn_over = 'slide'
        path = fmt.map_file(out_dir, row)
        fmt.make_parent(path)
        if drawn_over == 'mosaic' and storage.exists(path):
            before = map_background(path)   # a map over a slide or thumbnail is kept
            if before != 'mosaic':
                other = os.path.splitext(path)[0] + MOSAIC_SUFFIX
                how = (f'over its {before}' if before else
                       'by an older version that did not record over what')
                log.warning('cluster maps: %s was drawn %s and is kept; the map without a '
                            'thumbnail goes to %s (give the thumbnail, or the slide, to redraw '
                            'it)', path, how, other)
                path = other
        step = info.get('checkpoint_step')
        title = ' · '.join(p for p in (slide_id, step is not None and f'step {step}',
                                       k and f'K={k}', run) if p)
        found = annotations and ann_lib.find_annotation_file(annotations, slide_id)
        if annotations and found is None:   # else outlined on the map of their slide
            log.info('cluster maps: no annotation file for %s in %s', slide_id, annotations)
        contours = found and ann_lib.read_annotations(found)
        with atomic_write(path) as tmp:
            draw_cluster_map(arrays['coords'][known], arrays['cluster_ids'][known],
                             arrays.get('patch_size') or 224, thumbnail=thumb, downsample=scale,
                             slide_dimensions=dimensions, alpha=alpha, num_clusters=k,
                             max_side=int(max_side), out_path=tmp, title=title,
                             png_text={BACKGROUND_KEY: drawn_over}, annotations=contours)
        written.append(path)
    return written


def write_export_geojson(out_dir):
    """The GeoJSON of every slide with coordinates and cluster ids; returns the paths."""
    written = []
    for row, arrays, known, k in fmt.clustered_slides(out_dir, 'qupath'):
        path = coords_lib.slide_path(storage.join(out_dir, fmt.QUPATH_DIR), row['slide_id'],
                                     '.geojson')
        fmt.make_parent(path)
        write_cluster_geojson(path, arrays['coords'][known], arrays.get('patch_size') or 224,
                              arrays['cluster_ids'][known], palette_for(k), row['slide_id'])
        written.append(path)
    return written


def write_cluster_geojson(path: str, coords: np.ndarray, patch_size_level0: float,
                          cluster_ids: np.ndarray, palette: np.ndarray, slide_id: str) -> None:
    """One 'tile' Feature per patch (a level-0 square, class 'cluster c'), written compactly."""
    coords, cluster_ids = np.asarray(coords), np.asarray(cluster_ids).reshape(-1)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(cluster_ids) != len(coords):
        raise ValueError(f'coords {coords.shape} must be [N, 2], N = {len(cluster_ids)} ids')
    if (coords < 0).any():   # an export of a patch folder
        unknown = int((coords < 0).any(axis=1).sum())
        raise DataError(f'{path}: {unknown} patches have no level-0 coordinates (-1); a '
                        f'cluster GeoJSON needs patches tiled from a slide')
    size = float(patch_size_level0)
    colors = [[int(v) for v in row] for row in np.asarray(palette)[:, :3]]

    def number(value):   # an int when whole (most tiles): keeps the files small
        return int(value) if float(value).is_integer() else round(float(value), 3)

    with atomic_write(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
        f.write('{"type":"FeatureCollection","features":[')
        for i, ((x, y), cluster) in enumerate(zip(coords.tolist(), map(int, cluster_ids.tolist()))):
            x0, y0, x1, y1 = (number(v) for v in (x, y, float(x) + size, float(y) + size))
            feature = {'type': 'Feature', 'geometry': {'type': 'Polygon', 'coordinates': [
                [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
                'properties': {'objectType': 'tile', 'classification': {
                    'name': f'cluster {cluster}', 'color': colors[cluster % len(colors)]},
                    'cluster': cluster, 'slide_id': slide_id}}
            f.write((',' if i else '') + json.dumps(feature, separators=(',', ':')))
        f.write(']}')
