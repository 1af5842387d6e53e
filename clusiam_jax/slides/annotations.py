"""Region annotations on a slide: reading QuPath GeoJSON and ASAP XML, labelling patches by
the region they fall in, drawing outlines on a thumbnail (export/qupath.py writes the
cluster tiles QuPath imports).

All coordinates are level-0 slide pixels, x to the right and y down, in every format read
or written here, so an annotation, a patch's top-left corner and a tile written back line
up without any conversion.

Formats read (chosen by content, not by extension, since `.json` files can hold either):

  QuPath GeoJSON   a FeatureCollection, a single Feature, or a bare list of Features (what
                   QuPath before 0.3 wrote). Polygon and MultiPolygon geometries are kept,
                   holes included; features with no area (points, lines) are skipped. The
                   class is `properties.classification.name` (or `classification` itself
                   when it is a string), else `properties.name`, else 'annotation'.
  ASAP XML         the Camelyon16/17 format. The class is the `PartOfGroup` attribute (else
                   `Name`); Polygon, Spline and Rectangle annotations give polygons (a
                   spline is taken as the polygon through its control points), Dot and
                   PointSet are skipped. In Camelyon16 the groups `_0` and `_1` are tumour
                   and `_2` marks exclusion regions (normal tissue drawn inside a tumour
                   outline). The names are kept as written: `label_points` gives a point
                   inside several regions the class of the smallest one, so an exclusion
                   drawn inside a tumour wins over the tumour around it.

Self-intersecting polygons (common in hand-drawn outlines) are repaired with
`shapely.make_valid`, keeping only the polygonal parts.

Nothing here imports JAX: it runs inside data worker processes as well.
"""
import colorsys
import dataclasses
import json
import math
import os
import xml.etree.ElementTree as ET
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import shapely
from shapely.errors import ShapelyError
from shapely.geometry import MultiPolygon, Polygon, shape

from clusiam_jax.errors import DataError

# Searched in this order next to a slide; `.json` is QuPath's other GeoJSON extension.
ANNOTATION_EXTENSIONS = ('.geojson', '.json', '.xml')
DEFAULT_NAME = 'annotation'
# ASAP annotation types that enclose an area (compared in lower case).
_ASAP_AREA_TYPES = ('polygon', 'spline', 'rectangle')
# ASAP writes PartOfGroup="None" for an annotation in no group.
_ASAP_NO_GROUP = ('', 'none')
# Strong colours that stay readable over pink/purple H&E tissue and a white background.
_COLORS = (
    (0, 190, 0), (0, 80, 255), (255, 140, 0), (0, 210, 230), (240, 220, 0), (0, 0, 0),
    (220, 0, 0), (0, 100, 0), (0, 0, 140), (140, 70, 0), (255, 255, 255), (110, 110, 110),
)
# Fixed-point bits for cv2 drawing: outlines keep sub-pixel positions after downsampling.
_DRAW_SHIFT = 4


@dataclasses.dataclass(frozen=True)
class Annotation:
    """One annotated region: its class name and its outline (holes included) in level-0
    pixels."""
    name: str
    geometry: object  # shapely Polygon or MultiPolygon


# ------------------------------------------------------------------------ reading

def read_annotations(path: str) -> List[Annotation]:
    """The polygonal annotations of a QuPath GeoJSON or ASAP XML file, in file order.

    The format is told from the content (a `.json` may be either); a file that cannot be
    read, parsed, or holds no polygon at all raises DataError, since labelling a slide with
    no regions would silently call every patch 'normal'.
    """
    data = _read_bytes(path)
    start = data.lstrip(b'\xef\xbb\xbf \t\r\n')[:1]
    if start == b'<':
        annotations, skipped = _parse_asap(path, data)
    elif start in (b'{', b'['):
        annotations, skipped = _parse_geojson(path, data)
    else:
        raise DataError(f'{path}: neither GeoJSON nor ASAP XML (starts with {start!r})')
    if not annotations:
        raise DataError(f'{path}: no polygon annotation ({skipped} without an area skipped)')
    return annotations


def find_annotation_file(folder: str, slide_id: str) -> Optional[str]:
    """`<folder>/<slide_id><ext>` for the first extension of ANNOTATION_EXTENSIONS that
    exists (lower case first, then upper case, as some scanners' exports write `.XML`),
    or None: a slide without annotations is normal, not an error."""
    for ext in ANNOTATION_EXTENSIONS:
        for variant in (ext, ext.upper()):
            candidate = os.path.join(folder, slide_id + variant)
            if os.path.isfile(candidate):
                return candidate
    return None


def _read_bytes(path: str) -> bytes:
    """The file's bytes, or DataError naming the file. Bytes, not text: XML declares its
    own encoding, which ElementTree honours only when given bytes."""
    if not os.path.isfile(path):
        raise DataError(f'{path}: no such annotation file')
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as e:
        raise DataError(f'{path}: cannot read the annotation file ({e.strerror})') from None


def _polygonal(geometry) -> Optional[object]:
    """The area-bearing part of a geometry as one Polygon or MultiPolygon, repaired when
    invalid (a self-intersecting outline still encloses tissue); None when there is none."""
    if geometry is None or geometry.is_empty:
        return None
    geometry = shapely.force_2d(geometry)
    if not geometry.is_valid:
        geometry = shapely.make_valid(geometry)
    polygons = [p for p in _flat_parts(geometry)
                if isinstance(p, Polygon) and not p.is_empty and p.area > 0]
    if not polygons:
        return None
    return polygons[0] if len(polygons) == 1 else MultiPolygon(polygons)


def _flat_parts(geometry) -> Iterable[object]:
    """The single (non-multi, non-collection) geometries inside `geometry`."""
    if isinstance(geometry, (shapely.GeometryCollection, MultiPolygon,
                             shapely.MultiLineString, shapely.MultiPoint)):
        for part in shapely.get_parts(geometry):
            yield from _flat_parts(part)
    else:
        yield geometry


# ------------------------------------------------------------------------ GeoJSON

def _parse_geojson(path: str, raw: bytes) -> Tuple[List[Annotation], int]:
    """Annotations of a QuPath GeoJSON file and the number of features without area."""
    try:
        data = json.loads(raw)  # bytes: json detects UTF-8/16/32 and a byte-order mark
    except json.JSONDecodeError as e:
        raise DataError(f'{path}: not valid JSON ({e.msg} at line {e.lineno} column '
                        f'{e.colno})') from None
    except UnicodeDecodeError as e:
        raise DataError(f'{path}: not valid JSON text ({e.reason} at byte {e.start})') \
            from None
    annotations, skipped = [], 0
    for index, feature in enumerate(_features(path, data)):
        geometry = _feature_geometry(path, index, feature)
        if geometry is None:
            skipped += 1
            continue
        annotations.append(Annotation(_feature_name(feature), geometry))
    return annotations, skipped


def _features(path: str, data) -> List[dict]:
    """The features of a FeatureCollection, a single Feature, a bare geometry or a list
    of Features (older QuPath), so every shape QuPath has exported is accepted."""
    if isinstance(data, list):
        features = data
    elif isinstance(data, dict) and data.get('type') == 'FeatureCollection':
        features = data.get('features')
    elif isinstance(data, dict) and data.get('type') == 'Feature':
        features = [data]
    elif isinstance(data, dict) and 'coordinates' in data:
        features = [{'type': 'Feature', 'geometry': data, 'properties': {}}]
    else:
        raise DataError(f'{path}: JSON that is not GeoJSON (no FeatureCollection, Feature '
                        f'or list of Features)')
    if not isinstance(features, list) or not all(isinstance(f, dict) for f in features):
        raise DataError(f'{path}: GeoJSON whose features are not a list of objects')
    return features


def _feature_geometry(path: str, index: int, feature: dict) -> Optional[object]:
    """A feature's polygonal geometry, None when it has no area; DataError when the
    geometry is malformed (a broken file should not pass as one with fewer regions)."""
    geometry = feature.get('geometry')
    if not geometry:
        return None
    try:
        return _polygonal(shape(geometry))
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, ShapelyError) as e:
        raise DataError(f'{path}: feature {index} has a malformed geometry '
                        f'({type(e).__name__}: {" ".join(str(e).split())})') from None


def _feature_name(feature: dict) -> str:
    """The class of a feature: QuPath's classification (an object with a name, or a plain
    string in some exporters), else the object's name, else 'annotation'."""
    properties = feature.get('properties')
    if not isinstance(properties, dict):
        return DEFAULT_NAME
    classification = properties.get('classification')
    if isinstance(classification, dict) and classification.get('name'):
        return str(classification['name'])
    if isinstance(classification, str) and classification:
        return classification
    if properties.get('name'):
        return str(properties['name'])
    return DEFAULT_NAME


# ------------------------------------------------------------------------ ASAP XML

def _parse_asap(path: str, raw: bytes) -> Tuple[List[Annotation], int]:
    """Annotations of an ASAP XML file and the number of annotations without area."""
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as e:
        raise DataError(f'{path}: not valid XML ({e})') from None
    annotations, skipped = [], 0
    for index, element in enumerate(root.iter('Annotation')):
        geometry = None
        if element.get('Type', 'Polygon').strip().lower() in _ASAP_AREA_TYPES:
            points = _asap_points(path, index, element)
            geometry = _polygonal(Polygon(points)) if len(points) >= 3 else None
        if geometry is None:
            skipped += 1
            continue
        annotations.append(Annotation(_asap_name(element), geometry))
    return annotations, skipped


def _asap_points(path: str, index: int, element) -> List[Tuple[float, float]]:
    """An annotation's vertices sorted by their `Order` attribute (ASAP does not promise
    document order); a vertex without Order keeps its place after the numbered ones."""
    rows = []
    for position, coordinate in enumerate(element.iter('Coordinate')):
        try:
            x = _asap_number(coordinate.get('X'))
            y = _asap_number(coordinate.get('Y'))
            order = coordinate.get('Order')
            order = float(order) if order is not None else math.inf
        except (AttributeError, TypeError, ValueError):
            raise DataError(f'{path}: annotation {index} ({element.get("Name", "?")}) has '
                            f'a coordinate that is not a number: '
                            f'{dict(coordinate.attrib)}') from None
        rows.append((order, position, x, y))
    rows.sort()
    return [(x, y) for _, _, x, y in rows]


def _asap_number(value: Optional[str]) -> float:
    """A finite coordinate; ASAP saved on a comma-decimal locale writes '123,5'."""
    number = float(value.strip().replace(',', '.'))
    if not math.isfinite(number):
        raise ValueError(value)
    return number


def _asap_name(element) -> str:
    """The class of an ASAP annotation: its group, else its own name, else 'annotation'."""
    group = (element.get('PartOfGroup') or '').strip()
    if group.lower() not in _ASAP_NO_GROUP:
        return group
    return (element.get('Name') or '').strip() or DEFAULT_NAME


# ------------------------------------------------------------------------ labelling

def patch_centres(coords: np.ndarray, patch_size_level0: float) -> np.ndarray:
    """Centres of patches given their level-0 top-left corners: a patch is labelled by
    where its middle falls, not its corner, which would shift every label by half a patch."""
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f'coords must be [N, 2], got shape {coords.shape}')
    return coords + float(patch_size_level0) / 2.0


def label_points(annotations: Sequence[Annotation], points: np.ndarray,
                 default: str = 'normal') -> np.ndarray:
    """The class of each point [N, 2] (level-0 x, y): the annotation it lies in or on the
    edge of (a point in a hole is not in it); inside several, the smallest one (so a
    region drawn inside another, such as a Camelyon16 exclusion inside a tumour, wins;
    equal areas: the first in the list); inside none, `default`. Vectorised over points,
    one pass per annotation."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f'points must be [N, 2], got shape {points.shape}')
    labels = np.full(len(points), default, dtype=object)
    best_area = np.full(len(points), np.inf)
    x, y = points[:, 0], points[:, 1]
    for annotation in annotations:
        inside = _inside(annotation.geometry, x, y)
        area = annotation.geometry.area
        wins = inside & (area < best_area)
        labels[wins] = annotation.name
        best_area[wins] = area
    return labels


def _inside(geometry, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether each point lies in or on `geometry`; the bounding box is checked first so
    a small region on a slide of 100k patches tests only the few points near it."""
    x_min, y_min, x_max, y_max = geometry.bounds
    near = (x >= x_min) & (x <= x_max) & (y >= y_min) & (y <= y_max)
    inside = np.zeros(len(x), dtype=bool)
    if near.any():
        shapely.prepare(geometry)  # a no-op when already prepared
        inside[near] = shapely.intersects_xy(geometry, x[near], y[near])
    return inside


# ------------------------------------------------------------------------ drawing

def class_colors(names: Iterable[str]) -> Dict[str, Tuple[int, int, int]]:
    """An RGB colour per distinct name, assigned in sorted order so one set of classes is
    always drawn alike; after the fixed strong colours, hues spread by the golden ratio."""
    colors = {}
    for i, name in enumerate(sorted(set(names))):
        colors[name] = _COLORS[i] if i < len(_COLORS) else _extra_color(i - len(_COLORS))
    return colors


def _extra_color(i: int) -> Tuple[int, int, int]:
    """The i-th colour past the fixed list: saturated, hues as far apart as possible."""
    hue = (0.13 + i * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 1.0, 0.85)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def draw_contours(image: np.ndarray, annotations: Sequence[Annotation], downsample: float,
                  thickness: Optional[int] = None) -> np.ndarray:
    """A copy of an RGB uint8 image [H, W, 3] (a thumbnail at `downsample` level-0 px per
    pixel) with every annotation's outline and holes drawn in its class colour; the input
    stays untouched so the caller can still save the plain thumbnail. `thickness` is
    OpenCV's: 2 * thickness - 1 solid pixels plus an antialiased one on each side."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f'image must be uint8 [H, W, 3], got {image.dtype} {image.shape}')
    if not downsample > 0:
        raise ValueError(f'downsample must be positive, got {downsample}')
    out = np.ascontiguousarray(image).copy()
    if thickness is None:
        thickness = max(2, round(max(out.shape[:2]) / 500))
    colors = class_colors(a.name for a in annotations)
    rings: Dict[str, list] = {}
    for annotation in annotations:
        rings.setdefault(annotation.name, []).extend(
            _scaled_rings(annotation.geometry, downsample))
    for name, polylines in rings.items():
        if polylines:
            cv2.polylines(out, polylines, isClosed=True, color=colors[name],
                          thickness=int(thickness), lineType=cv2.LINE_AA, shift=_DRAW_SHIFT)
    return out


def _scaled_rings(geometry, downsample: float) -> List[np.ndarray]:
    """Every exterior and hole of a (Multi)Polygon in thumbnail pixels, as the fixed-point
    int32 arrays cv2.polylines takes with `shift`."""
    scale = (1 << _DRAW_SHIFT) / float(downsample)
    rings = []
    for polygon in _flat_parts(geometry):
        if not isinstance(polygon, Polygon) or polygon.is_empty:
            continue
        for ring in (polygon.exterior, *polygon.interiors):
            xy = np.asarray(ring.coords, dtype=np.float64)[:, :2]
            rings.append(np.round(xy * scale).astype(np.int32).reshape(-1, 1, 2))
    return rings
