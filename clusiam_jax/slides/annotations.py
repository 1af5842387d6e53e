"""Region annotations: reading QuPath GeoJSON and ASAP XML (told by content: a `.json`
may be either), labelling patches by the region they fall in, drawing outlines on a
thumbnail. Coordinates are level-0 pixels everywhere, so annotations and patches line up.

GeoJSON: a FeatureCollection, a Feature, or a bare list of Features (QuPath before 0.3);
the class is `classification.name` (or a string `classification`), else `name`. ASAP XML
(Camelyon16/17): the class is `PartOfGroup`, else `Name`; splines are taken as the polygon
through their control points. Names are kept as written: a point inside several regions
gets the smallest one's class, so a Camelyon16 exclusion (`_2`) drawn inside a tumour wins.
Arealess shapes are skipped; self-intersecting outlines are repaired (shapely.make_valid).
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
    """One annotated region: its class and outline (holes included), level-0 px."""
    name: str
    geometry: object  # shapely Polygon or MultiPolygon


# ------------------------------------------------------------------------ reading

def read_annotations(path: str) -> List[Annotation]:
    """The polygonal annotations of a file, in file order; DataError also when it holds
    none, which would silently call every patch 'normal'."""
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
    """`<folder>/<slide_id><ext>` for the first extension that exists (lower case, then
    upper: some exports write `.XML`), or None: a slide may have no annotations."""
    for ext in ANNOTATION_EXTENSIONS:
        for variant in (ext, ext.upper()):
            candidate = os.path.join(folder, slide_id + variant)
            if os.path.isfile(candidate):
                return candidate
    return None


def _read_bytes(path: str) -> bytes:
    """Bytes, not text: ElementTree honours XML's declared encoding only in bytes."""
    if not os.path.isfile(path):
        raise DataError(f'{path}: no such annotation file')
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as e:
        raise DataError(f'{path}: cannot read the annotation file ({e.strerror})') from None


def _polygonal(geometry) -> Optional[object]:
    """The area-bearing part as one (Multi)Polygon, repaired when invalid (a
    self-intersecting outline still encloses tissue); None without any."""
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
    """The features of every shape QuPath has exported (see module), or a bare geometry."""
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
    """A feature's polygonal geometry, None without area; DataError when malformed (a
    broken file must not pass as one with fewer regions)."""
    geometry = feature.get('geometry')
    if not geometry:
        return None
    try:
        return _polygonal(shape(geometry))
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, ShapelyError) as e:
        raise DataError(f'{path}: feature {index} has a malformed geometry '
                        f'({type(e).__name__}: {" ".join(str(e).split())})') from None


def _feature_name(feature: dict) -> str:
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
    """Vertices by `Order` (ASAP does not promise document order), those without it
    after, in place."""
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
    group = (element.get('PartOfGroup') or '').strip()
    if group.lower() not in _ASAP_NO_GROUP:
        return group
    return (element.get('Name') or '').strip() or DEFAULT_NAME


# ------------------------------------------------------------------------ labelling

def patch_centres(coords: np.ndarray, patch_size_level0: float) -> np.ndarray:
    """A patch is labelled by its middle, not its corner (half a patch off)."""
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f'coords must be [N, 2], got shape {coords.shape}')
    return coords + float(patch_size_level0) / 2.0


def label_points(annotations: Sequence[Annotation], points: np.ndarray,
                 default: str = 'normal') -> np.ndarray:
    """The class of each level-0 point [N, 2]: of the annotation it lies in or on (not in
    a hole); inside several, the smallest (the first of equal ones), so a region drawn
    inside another wins; inside none, `default`."""
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
    """Whether each point lies in or on `geometry`; only those in its bounding box are
    tested."""
    x_min, y_min, x_max, y_max = geometry.bounds
    near = (x >= x_min) & (x <= x_max) & (y >= y_min) & (y <= y_max)
    inside = np.zeros(len(x), dtype=bool)
    if near.any():
        shapely.prepare(geometry)  # a no-op when already prepared
        inside[near] = shapely.intersects_xy(geometry, x[near], y[near])
    return inside


# ------------------------------------------------------------------------ drawing

def class_colors(names: Iterable[str]) -> Dict[str, Tuple[int, int, int]]:
    """An RGB colour per name, in sorted order so one set of classes is always drawn
    alike; past the fixed colours, hues spread by the golden ratio."""
    colors = {}
    for i, name in enumerate(sorted(set(names))):
        colors[name] = _COLORS[i] if i < len(_COLORS) else _extra_color(i - len(_COLORS))
    return colors


def _extra_color(i: int) -> Tuple[int, int, int]:
    hue = (0.13 + i * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 1.0, 0.85)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def draw_contours(image: np.ndarray, annotations: Sequence[Annotation], downsample: float,
                  thickness: Optional[int] = None) -> np.ndarray:
    """A copy of a uint8 RGB thumbnail at `downsample` level-0 px per pixel with every
    outline and hole drawn in its class colour (`thickness`: OpenCV's)."""
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
    """Every ring of a (Multi)Polygon in thumbnail px, fixed-point for cv2.polylines."""
    scale = (1 << _DRAW_SHIFT) / float(downsample)
    rings = []
    for polygon in _flat_parts(geometry):
        if not isinstance(polygon, Polygon) or polygon.is_empty:
            continue
        for ring in (polygon.exterior, *polygon.interiors):
            xy = np.asarray(ring.coords, dtype=np.float64)[:, :2]
            rings.append(np.round(xy * scale).astype(np.int32).reshape(-1, 1, 2))
    return rings
