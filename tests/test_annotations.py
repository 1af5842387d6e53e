"""Annotations: QuPath GeoJSON and ASAP XML reading, point labelling against an independent
point-in-polygon test (OpenCV), outline drawing, and the cluster GeoJSON round trip."""
import json
import os

import cv2
import numpy as np
import pytest
from shapely.geometry import Polygon

from clusiam_jax.errors import DataError
from clusiam_jax.export.maps import write_cluster_geojson
from clusiam_jax.slides.annotations import (
    ANNOTATION_EXTENSIONS,
    Annotation,
    class_colors,
    draw_contours,
    find_annotation_file,
    label_points,
    patch_centres,
    read_annotations,
)


def shoelace(ring):
    """Unsigned area of a ring of (x, y) vertices, computed by hand (closed or not)."""
    xy = np.asarray(ring, dtype=np.float64)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def write_json(path, data):
    with open(path, 'w') as f:
        json.dump(data, f)
    return str(path)


def feature(geometry_type, coordinates, properties):
    return {'type': 'Feature', 'geometry': {'type': geometry_type, 'coordinates': coordinates},
            'properties': properties}


# Level-0 rings: an outer rectangle with a rectangular hole, two pieces of a MultiPolygon,
# and a non-convex polygon.
OUTER = [[0, 0], [100, 0], [100, 80], [0, 80], [0, 0]]
HOLE = [[20, 20], [20, 50], [40, 50], [40, 20], [20, 20]]
PIECE_A = [[200, 10], [260, 15], [250, 70], [205, 60], [200, 10]]
PIECE_B = [[300, 300], [340, 300], [320, 350], [300, 300]]
ARROW = [[500, 500], [600, 520], [540, 560], [610, 640], [490, 600], [500, 500]]


def qupath_collection():
    return {'type': 'FeatureCollection', 'features': [
        feature('Polygon', [OUTER, HOLE],
                {'objectType': 'annotation',
                 'classification': {'name': 'Tumor', 'color': [200, 0, 0]}}),
        feature('MultiPolygon', [[PIECE_A], [PIECE_B]],
                {'classification': {'name': 'Stroma', 'colorRGB': -16711936}}),
        feature('Point', [50, 50], {'classification': {'name': 'Tumor'}}),
        feature('Polygon', [ARROW], {'classification': 'Necrosis'}),
        feature('Polygon', [[[700, 700], [720, 700], [720, 730], [700, 700]]],
                {'name': 'my region'}),
        feature('LineString', [[0, 0], [5, 5]], {}),
        {'type': 'Feature', 'geometry': {'type': 'Polygon',
                                         'coordinates': [[[0, 900], [9, 900], [9, 909]]]}},
    ]}


def test_geojson_reads_classes_areas_holes_and_skips_features_without_area(tmp_path):
    path = write_json(tmp_path / 's.geojson', qupath_collection())
    annotations = read_annotations(path)
    assert [a.name for a in annotations] == [
        'Tumor', 'Stroma', 'Necrosis', 'my region', 'annotation']
    tumor, stroma, necrosis, named, unnamed = (a.geometry for a in annotations)
    assert tumor.geom_type == 'Polygon' and len(tumor.interiors) == 1
    assert tumor.area == pytest.approx(shoelace(OUTER) - shoelace(HOLE))
    assert tumor.area == pytest.approx(100 * 80 - 20 * 30)
    assert stroma.geom_type == 'MultiPolygon' and len(stroma.geoms) == 2
    assert stroma.area == pytest.approx(shoelace(PIECE_A) + shoelace(PIECE_B))
    assert necrosis.area == pytest.approx(shoelace(ARROW))
    assert named.area == pytest.approx(300.0)
    assert unnamed.area == pytest.approx(40.5)


@pytest.mark.parametrize('layout', ['list', 'feature'])
def test_geojson_bare_list_and_single_feature(tmp_path, layout):
    features = qupath_collection()['features']
    data = features if layout == 'list' else features[0]
    annotations = read_annotations(write_json(tmp_path / 'a.json', data))
    expected = 5 if layout == 'list' else 1
    assert len(annotations) == expected and annotations[0].name == 'Tumor'
    assert annotations[0].geometry.area == pytest.approx(7400.0)


def test_self_intersecting_polygon_is_repaired(tmp_path):
    bowtie = [[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]
    path = write_json(tmp_path / 'b.geojson',
                      feature('Polygon', [bowtie], {'classification': {'name': 'T'}}))
    (annotation,) = read_annotations(path)
    assert annotation.geometry.is_valid
    assert annotation.geometry.area == pytest.approx(50.0)  # two triangles of 25


# ------------------------------------------------------------------------ ASAP XML

# A non-convex outline: drawn in another vertex order it encloses a different area.
ASAP_RING = [(1000.5, 1000.0), (1400.0, 1050.25), (1200.0, 1150.0), (1450.0, 1400.0),
             (1010.0, 1380.0)]
ASAP_ORDER = [3, 0, 4, 1, 2]  # the file lists the vertices out of order


def asap_xml():
    coordinates = ''.join(
        f'<Coordinate Order="{i}" X="{ASAP_RING[i][0]}" Y="{ASAP_RING[i][1]}" />'
        for i in ASAP_ORDER)
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n<ASAP_Annotations><Annotations>'
        f'<Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">'
        f'<Coordinates>{coordinates}</Coordinates></Annotation>'
        '<Annotation Name="Annotation 1" Type="Dot" PartOfGroup="_0"><Coordinates>'
        '<Coordinate Order="0" X="5" Y="5" /></Coordinates></Annotation>'
        '<Annotation Name="Annotation 2" Type="Spline" PartOfGroup="None"><Coordinates>'
        '<Coordinate Order="0" X="0" Y="0" /><Coordinate Order="1" X="30" Y="0" />'
        '<Coordinate Order="2" X="30" Y="40" /></Coordinates></Annotation>'
        '<Annotation Name="Annotation 3" Type="Rectangle" PartOfGroup="_2"><Coordinates>'
        '<Coordinate Order="0" X="1100" Y="1100" /><Coordinate Order="1" X="1150" Y="1100" />'
        '<Coordinate Order="2" X="1150" Y="1120" /><Coordinate Order="3" X="1100" Y="1120" />'
        '</Coordinates></Annotation>'
        '</Annotations><AnnotationGroups><Group Name="_0" PartOfGroup="None" Color="#64FE2E">'
        '<Attributes /></Group></AnnotationGroups></ASAP_Annotations>')


def test_asap_sorts_by_order_and_skips_dots(tmp_path):
    path = tmp_path / 'tumor_001.xml'
    path.write_text(asap_xml())
    annotations = read_annotations(str(path))
    assert [a.name for a in annotations] == ['_0', 'Annotation 2', '_2']
    polygon = annotations[0].geometry
    assert polygon.equals(Polygon(ASAP_RING))
    assert polygon.area == pytest.approx(shoelace(ASAP_RING))
    # The file order would be a different outline: the test above could tell them apart.
    assert shoelace([ASAP_RING[i] for i in ASAP_ORDER]) != pytest.approx(shoelace(ASAP_RING))
    assert annotations[1].geometry.area == pytest.approx(600.0)
    assert annotations[2].geometry.area == pytest.approx(1000.0)


def test_broken_xml_names_the_file(tmp_path):
    path = tmp_path / 'broken.xml'
    path.write_text(asap_xml()[:-30])
    with pytest.raises(DataError, match='broken.xml') as error:
        read_annotations(str(path))
    assert 'XML' in str(error.value) and '\n' not in str(error.value)


@pytest.mark.parametrize('content, message', [
    (json.dumps(feature('Point', [1, 2], {})), 'no polygon'),
    (json.dumps({'type': 'FeatureCollection', 'features': []}), 'no polygon'),
    ('<ASAP_Annotations><Annotations/></ASAP_Annotations>', 'no polygon'),
    ('{"type": "FeatureCollection", "features": [', 'not valid JSON'),
    (json.dumps(feature('Polygon', [[1, 2]], {})), 'malformed geometry'),
    (json.dumps({'hello': 1}), 'not GeoJSON'),
    ('x,y\n1,2\n', 'neither GeoJSON nor ASAP XML'),
])
def test_unusable_files_raise_data_error(tmp_path, content, message):
    path = tmp_path / 'bad.json'
    path.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        read_annotations(str(path))
    assert str(path) in str(error.value)


def test_missing_file_raises_data_error(tmp_path):
    with pytest.raises(DataError, match='no such annotation file'):
        read_annotations(str(tmp_path / 'nope.geojson'))


def test_find_annotation_file_takes_the_first_extension(tmp_path):
    assert find_annotation_file(str(tmp_path), 'slide') is None
    for ext in reversed(ANNOTATION_EXTENSIONS):
        (tmp_path / f'slide{ext}').write_text('{}')
        assert find_annotation_file(str(tmp_path), 'slide') == str(tmp_path / f'slide{ext}')
    assert find_annotation_file(str(tmp_path), 'other') is None


# ------------------------------------------------------------------------ labelling

def star(centre, radii, rng_angle_offset=0.0):
    """A non-convex star-shaped polygon with integer vertices."""
    angles = np.linspace(0, 2 * np.pi, len(radii), endpoint=False) + rng_angle_offset
    xy = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1)
    return np.round(xy)


def cv2_inside(ring, points, margin=1e-2):
    """OpenCV's point-in-polygon test: inside flags and which points are clear of the edge
    (float32 rounding makes points within `margin` of an edge ambiguous)."""
    contour = np.asarray(ring, dtype=np.float32).reshape(-1, 1, 2)
    signed = np.array([cv2.pointPolygonTest(contour, (float(x), float(y)), True)
                       for x, y in points])
    return signed >= 0, np.abs(signed) > margin


def test_label_points_matches_opencv_with_nesting():
    rng = np.random.default_rng(0)
    outer = star((500, 500), rng.uniform(200, 400, 14))
    inner = star((520, 480), rng.uniform(40, 120, 9), 0.2)
    other = star((1300, 300), rng.uniform(50, 150, 7))
    assert Polygon(outer).contains(Polygon(inner))  # the exclusion is nested
    annotations = [Annotation('_0', Polygon(outer)), Annotation('_2', Polygon(inner)),
                   Annotation('stroma', Polygon(other))]
    points = np.concatenate([rng.uniform([0, 0], [1600, 1000], (3000, 2)),
                             rng.uniform([400, 360], [640, 600], (500, 2))])
    in_outer, clear_outer = cv2_inside(outer, points)
    in_inner, clear_inner = cv2_inside(inner, points)
    in_other, clear_other = cv2_inside(other, points)
    expected = np.where(in_inner, '_2', np.where(in_outer, '_0',
                                                 np.where(in_other, 'stroma', 'normal')))
    clear = clear_outer & clear_inner & clear_other
    labels = label_points(annotations, points)
    assert labels.dtype == object and labels.shape == (len(points),)
    np.testing.assert_array_equal(labels[clear], expected[clear])
    assert clear.sum() > 3400
    assert {'_0', '_2', 'stroma', 'normal'} <= set(labels[clear])
    # Order in the list does not matter: the smaller region still wins.
    np.testing.assert_array_equal(label_points(annotations[::-1], points), labels)


def test_label_points_boundary_holes_and_default():
    square = Polygon([(0, 0), (100, 0), (100, 100), (0, 100)],
                     [[(40, 40), (60, 40), (60, 60), (40, 60)]])
    points = np.array([[100, 50], [0, 0], [50, 50], [10, 10], [100.001, 50], [40, 50]])
    labels = label_points([Annotation('tumor', square)], points, default='bg')
    assert labels.tolist() == ['tumor', 'tumor', 'bg', 'tumor', 'bg', 'tumor']
    assert label_points([], points).tolist() == ['normal'] * len(points)


def test_patch_centres():
    coords = np.array([[0, 0], [1024, 2048]], dtype=np.int64)
    np.testing.assert_allclose(patch_centres(coords, 448.5),
                               [[224.25, 224.25], [1248.25, 2272.25]])
    with pytest.raises(ValueError):
        patch_centres(np.zeros(4), 10)


# ------------------------------------------------------------------------ drawing

def test_class_colors_are_deterministic_and_distinct():
    names = [f'class {i}' for i in range(30)]
    colors = class_colors(names)
    assert colors == class_colors(reversed(names + names))
    assert len(set(colors.values())) == len(names)
    assert all(len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
               for c in colors.values())


def rect_band(shape, x0, y0, x1, y1, margin):
    """Pixels within `margin` of a rectangle's outline (a slight over-estimate outside the
    corners, so the pixels left out are surely clear of the line)."""
    y, x = np.mgrid[:shape[0], :shape[1]]
    inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    to_edge_inside = np.minimum.reduce([x - x0, x1 - x, y - y0, y1 - y])
    to_edge_outside = np.maximum.reduce([x0 - x, x - x1, y0 - y, y - y1])
    return np.where(inside, to_edge_inside, to_edge_outside) <= margin


def test_draw_contours_draws_edges_and_holes_only():
    tissue = (205, 170, 200)
    image = np.empty((100, 120, 3), np.uint8)
    image[:] = tissue
    before = image.copy()
    # Thumbnail square (10, 10)-(60, 50) with a hole (30, 20)-(40, 30), at downsample 4.
    square = Polygon([(40, 40), (240, 40), (240, 200), (40, 200)],
                     [[(120, 80), (160, 80), (160, 120), (120, 120)]])
    out = draw_contours(image, [Annotation('tumor', square)], downsample=4, thickness=2)
    color = np.array(class_colors(['tumor'])['tumor'], np.uint8)
    np.testing.assert_array_equal(image, before)  # the input is left alone
    for edge in (out[10, 12:59], out[50, 12:59], out[12:49, 10], out[12:49, 60],
                 out[20, 31:40], out[21:30, 40]):
        np.testing.assert_array_equal(edge, np.broadcast_to(color, edge.shape))
    # OpenCV draws thickness t as 2t - 1 solid pixels plus one antialiased on each side.
    drawn = rect_band(out.shape[:2], 10, 10, 60, 50, 3) | rect_band(out.shape[:2], 30, 20,
                                                                     40, 30, 3)
    np.testing.assert_array_equal(out[~drawn], before[~drawn])
    assert (out[13:47, 13:57] == before[13:47, 13:57]).all(axis=2).mean() > 0.7


def test_draw_contours_default_thickness_scales_with_image():
    square = Polygon([(80, 80), (400, 80), (400, 400), (80, 400)])
    small = np.zeros((100, 100, 3), np.uint8)  # default max(2, round(0.2)) = 2
    large = np.zeros((1500, 1500, 3), np.uint8)  # default max(2, round(3.0)) = 3
    for image, expected, other in ((small, 2, 3), (large, 3, 2)):
        out = draw_contours(image, [Annotation('x', square)], downsample=8)
        explicit = draw_contours(image, [Annotation('x', square)], 8, thickness=expected)
        np.testing.assert_array_equal(out, explicit)
        assert (out != draw_contours(image, [Annotation('x', square)], 8, other)).any()


# ------------------------------------------------------------------------ writing

def test_write_cluster_geojson_round_trip(tmp_path):
    coords = np.array([[0, 0], [300, 0], [300, 300], [5000, 1200], [10, 20000]], np.int64)
    cluster_ids = np.array([0, 1, 4, 2, 1], np.int32)
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    size = 300.5
    path = str(tmp_path / 'slide_7.geojson')
    write_cluster_geojson(path, coords, size, cluster_ids, palette, 'slide_7')
    assert os.listdir(tmp_path) == ['slide_7.geojson']  # no temporary left behind
    with open(path) as f:
        text = f.read()
    assert '\n' not in text and ', ' not in text  # compact
    data = json.loads(text)
    assert data['type'] == 'FeatureCollection' and len(data['features']) == len(coords)
    for (x, y), c, feat in zip(coords.tolist(), cluster_ids.tolist(), data['features']):
        assert feat['type'] == 'Feature' and feat['geometry']['type'] == 'Polygon'
        (ring,) = feat['geometry']['coordinates']
        assert len(ring) == 5 and ring[0] == ring[-1]
        corners = {tuple(p) for p in ring}
        assert corners == {(x, y), (x + size, y), (x + size, y + size), (x, y + size)}
        assert shoelace(ring) == pytest.approx(size * size)
        props = feat['properties']
        assert props['objectType'] == 'tile' and props['cluster'] == c
        assert props['slide_id'] == 'slide_7'
        assert props['classification'] == {'name': f'cluster {c}',
                                           'color': palette[c % 3].tolist()}
    tiles = read_annotations(path)
    assert [t.name for t in tiles] == [f'cluster {c}' for c in cluster_ids]
    assert all(t.geometry.area == pytest.approx(size * size) for t in tiles)
    labels = label_points(tiles, patch_centres(coords, size), default='none')
    assert labels.tolist() == [f'cluster {c}' for c in cluster_ids]


def test_write_cluster_geojson_refuses_unknown_coordinates(tmp_path):
    path = tmp_path / 'x.geojson'
    with pytest.raises(DataError, match='no level-0 coordinates'):
        write_cluster_geojson(str(path), np.array([[0, 0], [-1, -1]]), 256, np.array([0, 1]),
                              np.zeros((2, 3), np.uint8), 'x')
    assert not path.exists()
