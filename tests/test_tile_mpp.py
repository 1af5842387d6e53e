"""Tiling a folder where some slides lack µm/px, and folders where two slides share an id
(issue 23, items 1 and 7).

`tile.mpp_default` fills in µm/px only for slides whose metadata has none;
`tile.mpp_override` forces it on every slide and says which slides it contradicts; the
old `tile.mpp` is refused, naming both. A rerun says which finished slides it redoes and
why. Slides sharing an id are rows of their own, the other slides tiled.

Synthetic slides: tiled pyramidal TIFFs (tests/helpers.write_pyramid, µm/px in the TIFF
resolution tags) and the same without resolution tags (no µm/px, no objective power).
"""
import os

import pytest
import tifffile

from clusiam_jax import cli
from clusiam_jax.slides import coords as coords_lib
from clusiam_jax.slides import slides_csv
from tests.helpers import write_pyramid
from tests.test_slides import synthetic_base

# Small patches and a fine detection image, so the small synthetic field has many patches.
SMALL = ['--config.tile.patch_size=64', '--config.tile.tissue_mpp=2.0',
         '--config.tile.min_area_um2=1000', '--config.tile.num_workers=0']


def write_bare_pyramid(path, rgb, tile=128):
    """A tiled pyramidal TIFF without resolution tags: OpenSlide finds no µm/px and no
    objective power in it."""
    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb, tile=(tile, tile), compression='zlib', photometric='rgb')
        tw.write(rgb[::2, ::2], tile=(tile, tile), compression='zlib', photometric='rgb',
                 subfiletype=1)
    return path


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """`scan40`: 0.25 µm/px in its metadata; `bare`: the field at 0.5 µm/px, with none."""
    root = tmp_path_factory.mktemp('mixed')
    write_pyramid(str(root / 'scan40.tif'), synthetic_base(0.25), 0.25)
    write_bare_pyramid(str(root / 'bare.tif'), synthetic_base(0.5))
    return str(root)


def tile(slides, out, *flags):
    return cli.main(['--mode', 'tile', f'--config.tile.slides={slides}',
                     f'--config.tile.out_dir={out}', *SMALL, *flags])


def rows_of(out):
    return {r['slide_id']: r for r in slides_csv.read_rows(str(out))}


def lines_with(caplog, *words):
    return [r.getMessage() for r in caplog.records if all(w in r.getMessage() for w in words)]


def test_the_suggested_key_fills_in_only_slides_without_mpp(folder, tmp_path, caplog):
    out = tmp_path / 'tiles'
    assert tile(folder, out) == 0
    rows = rows_of(out)
    assert rows['bare']['status'] == 'no_mpp'
    # The fix proposed is the key that touches no other slide, or the CSV column.
    assert 'tile.mpp_default' in rows['bare']['reason']
    assert '"mpp" column' in rows['bare']['reason']
    assert 'tile.mpp=' not in rows['bare']['reason']
    meta = rows['scan40']
    assert meta['status'] == 'tiled' and float(meta['level0_mpp']) == pytest.approx(0.25)
    n_meta = int(meta['n_patches'])

    caplog.clear()
    assert tile(folder, out, '--config.tile.mpp_default=0.5') == 0
    rows = rows_of(out)
    # The slide with µm/px keeps its own, and its patches.
    assert float(rows['scan40']['level0_mpp']) == pytest.approx(0.25)
    assert rows['scan40']['mpp_origin'].startswith('slide metadata')
    assert int(rows['scan40']['n_patches']) == n_meta
    found = coords_lib.read_coords(coords_lib.trident_file(str(out), 'scan40'))
    assert found.attrs['level0_magnification'] == pytest.approx(40.0)
    # The other is tiled at the default, and says so.
    assert rows['bare']['status'] == 'tiled'
    assert float(rows['bare']['level0_mpp']) == 0.5
    assert rows['bare']['mpp_origin'] == 'tile.mpp_default'
    assert not lines_with(caplog, 'scan40', 'redo')

    # A changed default redoes the slide that used it, and says so; the other is reused.
    caplog.clear()
    assert tile(folder, out, '--config.tile.mpp_default=0.4') == 0
    rows = rows_of(out)
    assert float(rows['bare']['level0_mpp']) == 0.4
    assert int(rows['scan40']['n_patches']) == n_meta
    redone = lines_with(caplog, 'bare', 'redo')
    assert redone and any('tile.mpp_default' in x and '0.5' in x and '0.4' in x
                          for x in redone), caplog.text
    assert not lines_with(caplog, 'scan40', 'redo'), caplog.text

    # Dropping the default: the slide is no_mpp again, and its old coordinates are gone.
    assert tile(folder, out) == 0
    assert rows_of(out)['bare']['status'] == 'no_mpp'
    assert not os.path.exists(coords_lib.trident_file(str(out), 'bare'))


def test_the_override_forces_every_slide_and_logs_those_it_contradicts(folder, tmp_path,
                                                                         caplog):
    out = tmp_path / 'tiles'
    assert tile(folder, out, '--config.tile.mpp_default=0.5') == 0
    n_meta = int(rows_of(out)['scan40']['n_patches'])

    caplog.clear()
    assert tile(folder, out, '--config.tile.mpp_override=0.5') == 0
    rows = rows_of(out)
    meta = rows['scan40']
    assert float(meta['level0_mpp']) == 0.5 and meta['mpp_origin'] == 'tile.mpp_override'
    assert int(meta['n_patches']) > n_meta
    # The slide whose metadata it contradicts: both values and the ratio, logged and in
    # its row.
    assert '0.25' in meta['reason'] and 'x2' in meta['reason'], meta['reason']
    overridden = lines_with(caplog, 'scan40', 'tile.mpp_override', '0.25', '0.5', 'x2')
    assert overridden, caplog.text
    # The slide without metadata contradicts nothing.
    assert rows['bare']['reason'] == ''
    assert not lines_with(caplog, 'bare', 'replaces')
    # Its µm/px changed: the rerun says it redoes it, from what to what.
    redone = lines_with(caplog, 'scan40', 'redo')
    assert any('tile.mpp_override' in x and '0.25' in x and '0.5' in x for x in redone), \
        caplog.text


def test_a_grid_change_is_logged_per_redone_slide(folder, tmp_path, caplog):
    out = tmp_path / 'tiles'
    assert tile(folder, out) == 0
    caplog.clear()
    assert tile(folder, out, '--config.tile.overlap=16') == 0
    assert any('tile.overlap 0 -> 16' in x for x in lines_with(caplog, 'scan40', 'redo')), \
        caplog.text
    assert not lines_with(caplog, 'bare', 'redo')   # it had no coordinates to redo


@pytest.mark.parametrize('flags, words', [
    (['--config.tile.mpp=0.5'], ['tile.mpp_default', 'tile.mpp_override']),
    (['--config.tile.mpp_default=0.5', '--config.tile.mpp_override=0.5'], ['one of']),
    (['--config.tile.mpp_default=-1'], ['tile.mpp_default']),
])
def test_old_and_contradictory_mpp_keys_are_one_line_errors(folder, tmp_path, capsys,
                                                           flags, words):
    assert tile(folder, tmp_path / 'o', *flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_slides_sharing_an_id_are_rows_and_the_others_are_tiled(tmp_path):
    field = write_pyramid(str(tmp_path / 'field.tif'), synthetic_base(0.5), 0.5)
    slides = tmp_path / 'slides'
    for sub in ('a', 'b', 'c'):
        (slides / sub).mkdir(parents=True)
    os.symlink(field, slides / 'a' / 's1.tif')
    os.symlink(field, slides / 'b' / 's1.tif')
    os.symlink(field, slides / 'c' / 's2.tif')
    out = tmp_path / 'tiles'
    assert tile(slides, out) == 0
    rows = slides_csv.read_rows(str(out))
    assert sorted(r['slide_id'] for r in rows) == ['s1', 's1', 's2']
    s2 = [r for r in rows if r['slide_id'] == 's2'][0]
    assert s2['status'] == 'tiled' and int(s2['n_patches']) > 0
    clashing = sorted((r for r in rows if r['slide_id'] == 's1'), key=lambda r: r['path'])
    paths = [str(slides / 'a' / 's1.tif'), str(slides / 'b' / 's1.tif')]
    assert [r['path'] for r in clashing] == paths
    for row, other in zip(clashing, reversed(paths)):
        assert row['status'] == 'duplicate_id' and other in row['reason'], row
        assert row['n_patches'] == '0'
    assert not os.path.exists(coords_lib.trident_file(str(out), 's1'))

    # One copy removed: the rerun tiles s1 and its one row replaces both.
    os.remove(slides / 'b' / 's1.tif')
    assert tile(slides, out) == 0
    rows = slides_csv.read_rows(str(out))
    assert sorted((r['slide_id'], r['status']) for r in rows) == [('s1', 'tiled'),
                                                                  ('s2', 'tiled')]

    # The copy back: both rows again, and the coordinate file s1 had is removed (which
    # slide it belongs to is no longer known).
    os.symlink(field, slides / 'b' / 's1.tif')
    assert tile(slides, out) == 0
    rows = slides_csv.read_rows(str(out))
    assert sorted((r['slide_id'], r['status']) for r in rows) == [
        ('s1', 'duplicate_id'), ('s1', 'duplicate_id'), ('s2', 'tiled')]
    assert not os.path.exists(coords_lib.trident_file(str(out), 's1'))
