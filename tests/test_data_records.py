"""Patch discovery (folder layouts, manifests) and reading images (load_rgb)."""
import csv
import io
import os

import numpy as np
import pytest
from PIL import Image

from clusiam_jax import data
from clusiam_jax.data import records
from clusiam_jax.errors import DataError


def _png(path, size=(12, 10), mode='RGB', seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)


@pytest.fixture
def original_layout(tmp_path):
    """root/<class>/<slide>/<x>_<y>.png, as the original CluSiam globbed it."""
    root = tmp_path / 'patches'
    expected = []
    for cls, slide, x, y in [('tumor', 'tumor_001', 1024, 2048), ('tumor', 'tumor_001', 0, 224),
                             ('normal', 'normal_007', 448, 672), ('normal', 'normal_010', 3, 5)]:
        path = root / cls / slide / f'{x}_{y}.png'
        _png(str(path), seed=x)
        expected.append(data.PatchRecord(str(path), slide, cls, x, y))
    (root / 'normal' / 'notes.txt').write_text('not an image')
    return root, sorted(expected, key=lambda r: r.path)


def test_original_layout_parsed(original_layout):
    root, expected = original_layout
    assert data.discover(str(root)) == expected


def test_manifest_gives_the_same_records(original_layout, tmp_path):
    root, expected = original_layout
    manifest = tmp_path / 'list.csv'
    with open(manifest, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['path', 'slide_id', 'label', 'x', 'y'])
        for r in reversed(expected):  # order in the file must not matter
            writer.writerow([os.path.relpath(r.path, tmp_path), r.slide_id, r.label, r.x, r.y])
    assert data.discover(str(manifest)) == expected
    # A manifest of paths only: slide and coordinates come from the path.
    only_paths = tmp_path / 'paths.csv'
    with open(only_paths, 'w', newline='') as f:
        f.write('path\n' + '\n'.join(r.path for r in expected) + '\n')
    got = data.discover(str(only_paths))
    assert [(r.path, r.slide_id, r.x, r.y, r.label) for r in got] == \
        [(r.path, r.slide_id, r.x, r.y, None) for r in expected]


def test_write_then_read_manifest_roundtrip(original_layout, tmp_path):
    _, expected = original_layout
    path = tmp_path / 'm.csv'
    data.write_patch_manifest(expected, str(path))
    assert data.read_patch_manifest(str(path)) == expected


@pytest.mark.parametrize('name,slide,x,y', [
    ('slideA/1024_2048.png', 'slideA', 1024, 2048),
    ('s/tumor_009_512_768.jpg', 's', 512, 768),
    ('s/patch_00016.png', 's', None, None),
    ('s/12.png', 's', None, None),
])
def test_coordinates_parsed_from_file_names(name, slide, x, y):
    rec = records.parse_patch_path('/data/' + name)
    assert (rec.slide_id, rec.x, rec.y) == (slide, x, y)


def test_any_depth_and_no_label_outside_original_layout(tmp_path):
    _png(str(tmp_path / 'a' / 'b' / 'c' / 'slide9' / '5_6.jpg'.replace('.jpg', '.png')))
    _png(str(tmp_path / 'top.png'))
    recs = data.discover(str(tmp_path))
    assert len(recs) == 2
    deep = [r for r in recs if r.slide_id == 'slide9'][0]
    assert (deep.label, deep.x, deep.y) == (None, 5, 6)


def test_clear_errors_for_missing_empty_and_bad_manifests(tmp_path):
    with pytest.raises(DataError, match='not found'):
        data.discover(str(tmp_path / 'nope'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no image files'):
        data.discover(str(tmp_path / 'empty'))
    bad = tmp_path / 'bad.csv'
    bad.write_text('file,slide\na.png,s\n')
    with pytest.raises(ValueError, match='no "path" column'):
        data.discover(str(bad))
    half = tmp_path / 'half.csv'
    half.write_text('path,x\na.png,3\n')
    with pytest.raises(ValueError, match='only one of'):
        data.discover(str(half))
    empty_csv = tmp_path / 'e.csv'
    empty_csv.write_text('path,label\n')
    with pytest.raises(ValueError, match='lists no patches'):
        data.discover(str(empty_csv))
    with pytest.raises(ValueError, match='empty'):
        data.discover('')


# ---------------------------------------------------------------------------
# load_rgb
# ---------------------------------------------------------------------------

def _encode(im, fmt):
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize('mode,fmt', [('RGB', 'PNG'), ('RGB', 'JPEG'), ('L', 'PNG'),
                                      ('RGBA', 'PNG'), ('LA', 'PNG'), ('P', 'PNG'),
                                      ('1', 'PNG'), ('RGB', 'TIFF'), ('RGB', 'BMP'),
                                      ('L', 'JPEG')])
def test_load_rgb_converts_like_pil(tmp_path, mode, fmt):
    arr = np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    if mode == 'RGBA':
        im = Image.fromarray(np.dstack([arr, arr[..., :1]]), 'RGBA')
    else:
        im = im.convert(mode)
    path = tmp_path / f'x.{fmt.lower()}'
    path.write_bytes(_encode(im, fmt))
    got = data.load_rgb(str(path))
    ref = np.asarray(Image.open(path).convert('RGB'))
    assert got.dtype == np.uint8 and got.shape == (9, 13, 3)
    np.testing.assert_array_equal(got, ref)


def test_load_rgb_scales_16_bit(tmp_path):
    arr16 = np.random.default_rng(0).integers(0, 65536, (6, 8), dtype=np.uint16)
    path = tmp_path / 'deep.png'
    Image.fromarray(arr16).save(path)
    got = data.load_rgb(str(path))
    ref = np.round(arr16 / 257.0).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], ref)


def test_load_rgb_raises_bad_image_error(tmp_path):
    good = _encode(Image.new('RGB', (20, 20), (200, 10, 10)), 'PNG')
    jpeg = _encode(Image.new('RGB', (64, 64), (10, 200, 10)), 'JPEG')
    cases = {
        'empty.png': b'',
        'text.png': b'hello, not an image',
        'truncated.png': good[:len(good) // 2],
        'truncated.jpg': jpeg[:len(jpeg) // 2],
        'noise.jpg': np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes(),
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(data.BadImageError):
            data.load_rgb(str(tmp_path / name))
    with pytest.raises(data.BadImageError):
        data.load_rgb(str(tmp_path / 'missing.png'))
