"""Region annotations in level-0 px: QuPath GeoJSON and ASAP XML (told by content), patches
labelled by the region they fall in (the smallest, so a Camelyon16 exclusion drawn inside a
tumour wins), outlines drawn on a thumbnail. ASAP splines are taken as the polygon through
their control points; self-intersecting outlines are repaired (shapely.make_valid).
"""
import colorsys
import dataclasses
import json
import math
import xml.etree.ElementTree as ET
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import shapely
from shapely.errors import ShapelyError
from shapely.geometry import MultiPolygon, Polygon, shape

from clusiam_jax import storage
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


def read_annotations(path: str) -> List[Annotation]:
    """The polygonal annotations of a file, in file order; DataError also when it holds
    none, which would silently call every patch 'normal'."""
    if not storage.isfile(path):
        raise DataError(f'{path}: no such annotation file')
    try:   # bytes: ElementTree honours XML's declared encoding
        data = storage.read_bytes(path)
    except OSError as e:
        raise DataError(f'{path}: cannot read the annotation file ({e.strerror})') from None
    start = data.lstrip(b'\xef\xbb\xbf \t\r\n')[:1]
    if start == b'<':
        found = _parse_asap(path, data)
    elif start in (b'{', b'['):
        found = _parse_geojson(path, data)
    else:
        raise DataError(f'{path}: neither GeoJSON nor ASAP XML (starts with {start!r})')
    annotations = [Annotation(name, g) for name, g in found if g is not None]
    if not annotations:
        raise DataError(f'{path}: no polygon annotation ({len(found)} without an area '
                        f'skipped)')
    return annotations


def find_annotation_file(folder: str, slide_id: str) -> Optional[str]:
    """The first `<folder>/<slide_id><ext>` found (`.XML` too), or None."""
    for ext in ANNOTATION_EXTENSIONS:
        for variant in (ext, ext.upper()):
            candidate = storage.join(folder, slide_id + variant)
            if storage.isfile(candidate):
                return candidate
    return None


def _polygonal(geometry) -> Optional[object]:
    """The area-bearing part as one (Multi)Polygon, repaired when invalid; None without."""
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
    parts = shapely.get_parts(geometry)
    while any(hasattr(p, 'geoms') for p in parts):
        parts = shapely.get_parts(parts)
    return parts


def _parse_geojson(path: str, raw: bytes) -> List[tuple]:
    """(name, polygonal geometry or None) of each feature of a FeatureCollection, a
    Feature, a bare list (QuPath before 0.3), or a geometry."""
    try:
        data = json.loads(raw)  # bytes: json detects UTF-8/16/32 and a byte-order mark
    except json.JSONDecodeError as e:
        raise DataError(f'{path}: not valid JSON ({e.msg} at line {e.lineno} column '
                        f'{e.colno})') from None
    except UnicodeDecodeError as e:
        raise DataError(f'{path}: not valid JSON text ({e.reason} at byte {e.start})') \
            from None
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
    return [(_feature_name(f), _feature_geometry(path, i, f)) for i, f in enumerate(features)]


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
    properties = properties if isinstance(properties, dict) else {}
    c = properties.get('classification')
    name = c.get('name') if isinstance(c, dict) else c if isinstance(c, str) else None
    return str(name or properties.get('name') or DEFAULT_NAME)


def _parse_asap(path: str, raw: bytes) -> List[tuple]:
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as e:
        raise DataError(f'{path}: not valid XML ({e})') from None
    found = []
    for index, element in enumerate(root.iter('Annotation')):
        geometry = None
        if element.get('Type', 'Polygon').strip().lower() in _ASAP_AREA_TYPES:
            points = _asap_points(path, index, element)
            geometry = _polygonal(Polygon(points)) if len(points) >= 3 else None
        name = (element.get('PartOfGroup') or '').strip()
        if name.lower() in _ASAP_NO_GROUP:   # in no group: by its own name
            name = (element.get('Name') or '').strip() or DEFAULT_NAME
        found.append((name, geometry))
    return found


def _asap_points(path: str, index: int, element) -> List[Tuple[float, float]]:
    """Vertices by `Order` (not promised in document order), those without it after."""
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


def patch_centres(coords: np.ndarray, patch_size_level0: float) -> np.ndarray:
    """A patch is labelled by its middle, not its corner."""
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f'coords must be [N, 2], got shape {coords.shape}')
    return coords + float(patch_size_level0) / 2.0


def label_points(annotations: Sequence[Annotation], points: np.ndarray,
                 default: str = 'normal') -> np.ndarray:
    """The class of each level-0 point [N, 2]: of the smallest annotation it lies in or on
    (not in a hole; the first of equal ones), else `default`."""
    points = np.asarray(points, dtype=np.float64)
    labels = np.full(len(points), default, dtype=object)
    best_area = np.full(len(points), np.inf)
    x, y = points[:, 0], points[:, 1]
    for annotation in annotations:
        geometry, area = annotation.geometry, annotation.geometry.area
        x_min, y_min, x_max, y_max = geometry.bounds   # only the points in its box tested
        near = (x >= x_min) & (x <= x_max) & (y >= y_min) & (y <= y_max) & (area < best_area)
        if near.any():
            shapely.prepare(geometry)  # a no-op when already prepared
            wins = np.flatnonzero(near)[shapely.intersects_xy(geometry, x[near], y[near])]
            labels[wins] = annotation.name
            best_area[wins] = area
    return labels


def class_colors(names: Iterable[str]) -> Dict[str, Tuple[int, int, int]]:
    """An RGB colour per name, in sorted order so one set of classes is always drawn
    alike; past the fixed colours, hues spread by the golden ratio."""
    colors = {}
    for i, name in enumerate(sorted(set(names))):
        hue = (0.13 + (i - len(_COLORS)) * 0.618033988749895) % 1.0
        colors[name] = _COLORS[i] if i < len(_COLORS) else tuple(
            int(round(c * 255)) for c in colorsys.hsv_to_rgb(hue, 1.0, 0.85))
    return colors


def draw_contours(image: np.ndarray, annotations: Sequence[Annotation], downsample: float,
                  thickness: Optional[int] = None) -> np.ndarray:
    """A copy of a uint8 RGB thumbnail at `downsample` level-0 px per pixel with every
    outline and hole drawn in its class colour (`thickness`: OpenCV's)."""
    out = np.ascontiguousarray(image).copy()
    if thickness is None:
        thickness = max(2, round(max(out.shape[:2]) / 500))
    colors = class_colors(a.name for a in annotations)
    scale = (1 << _DRAW_SHIFT) / float(downsample)   # fixed point for cv2.polylines
    rings: Dict[str, list] = {}
    for annotation in annotations:
        for polygon in _flat_parts(annotation.geometry):
            if isinstance(polygon, Polygon) and not polygon.is_empty:
                rings.setdefault(annotation.name, []).extend(
                    np.round(np.asarray(ring.coords, np.float64)[:, :2] * scale).astype(
                        np.int32).reshape(-1, 1, 2)
                    for ring in (polygon.exterior, *polygon.interiors))
    for name, polylines in rings.items():
        cv2.polylines(out, polylines, isClosed=True, color=colors[name],
                      thickness=int(thickness), lineType=cv2.LINE_AA, shift=_DRAW_SHIFT)
    return out
