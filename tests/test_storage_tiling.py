"""Tiling slides from a bucket into a bucket (issue 25): the same slides.csv rows, coordinate
files and QC pictures as tiling the same slides from local disk to local disk; a tiling split
over hosts merges into the slides.csv one host writes, and a host interrupted and run again
redoes only its unfinished slides. Against both loopback servers (tests/objstore.py).
"""
import os

import numpy as np
import pytest

from clusiam_jax import cli, storage
from clusiam_jax.config import default_config
from clusiam_jax.slides import coords as coords_lib
from clusiam_jax.slides import listing, slides_csv, tile_index, tiling
from tests.helpers import synthetic_tissue, write_pyramid

# The attributes that name where the slide is (or hash it): a local path vs a URL.
_WHERE = ('slide_path', 'tiling_key', 'tiling_inputs')


@pytest.fixture(scope='module')
def slide_folder(tmp_path_factory):
    """Four tiny pyramids (one in a subfolder), a damaged .svs, a note and a hidden slide."""
    root = tmp_path_factory.mktemp('wsi')
    (root / 'sub').mkdir()
    (root / '.hidden').mkdir()
    for i, (name, mpp) in enumerate([('s1', 1.0), ('sub/s2', 1.0), ('s3', 0.5), ('s4', 1.0)]):
        side = int(512 / mpp)
        rgb = synthetic_tissue(side * 3 // 4, side, [(side * 0.3, side * 0.3, side * 0.2),
                                                     (side * 0.7, side * 0.5, side * 0.15)],
                               seed=i)
        write_pyramid(str(root / f'{name}.tif'), rgb, mpp)
    (root / 'zz_broken.svs').write_bytes(b'not a slide' * 100)
    (root / 'notes.txt').write_text('not a slide')
    write_pyramid(str(root / '.hidden' / 'h.tif'), synthetic_tissue(300, 300, []), 1.0)
    return str(root)


def params():
    c = default_config().tile
    c.patch_size, c.target_mpp, c.tissue_mpp, c.min_area_um2 = 64, 1.0, 4.0, 1000.0
    return tiling.TileParams.from_config(c)


def uploaded(folder, bucket):
    url = storage.join(bucket, 'slides')
    storage.upload(folder, url, recursive=True)
    return url


def rows_of(out_dir, local_root='', url_root=''):
    return [{k: v.replace(local_root, url_root) if local_root else v for k, v in r.items()}
            for r in slides_csv.read_rows(out_dir)]


def assert_same_tiling(out_a, out_b, slide_ids, same_where=False):
    """Every coordinate file equal (arrays; attributes but where the slide is, unless
    `same_where`), every QC picture byte-equal."""
    for slide_id in slide_ids:
        a = coords_lib.read_coords(coords_lib.trident_file(out_a, slide_id))
        b = coords_lib.read_coords(coords_lib.trident_file(out_b, slide_id))
        np.testing.assert_array_equal(a.coords, b.coords)
        assert a.coords.dtype == b.coords.dtype == np.int64
        drop = () if same_where else _WHERE
        assert {k: v for k, v in a.attrs.items() if k not in drop} == \
            {k: v for k, v in b.attrs.items() if k not in drop}
    for name in storage.listdir(storage.join(out_a, 'masks')):
        assert storage.read_bytes(storage.join(out_a, 'masks', name)) == \
            storage.read_bytes(storage.join(out_b, 'masks', name)), name


def test_bucket_to_bucket_equals_local_to_local(slide_folder, bucket, tmp_path):
    local_out = str(tmp_path / 'out')
    local_rows = tiling.tile_slides(tiling.list_slides(slide_folder), params(), local_out)
    url = uploaded(slide_folder, bucket)
    assert listing.find_slides(url)[1] == listing.find_slides(slide_folder)[1] == {'.txt': 1}
    out = storage.join(bucket, 'tiling')
    rows = tiling.tile_slides(tiling.list_slides(url), params(), out, num_workers=2)

    assert [r['slide_id'] for r in rows] == ['s1', 's3', 's4', 's2', 'zz_broken']
    # Two workers write rows in the order slides finish (as on local disk): sorted by id.
    assert sorted(rows_of(out), key=str) == sorted(rows_of(local_out, slide_folder, url), key=str)
    statuses = {r['slide_id']: r['status'] for r in rows}
    assert statuses['zz_broken'] == slides_csv.UNREADABLE
    tiled = [s for s, st in statuses.items() if st == slides_csv.TILED]
    assert tiled == ['s1', 's3', 's4', 's2'] and len(local_rows) == len(rows)
    assert_same_tiling(out, local_out, tiled)
    found = coords_lib.read_coords(coords_lib.trident_file(out, 's2'))
    assert found.attrs['slide_path'] == f'{url}/sub/s2.tif'
    for slide_id in tiled:   # written for remote reads, checked against the object's size
        path = f'{url}/{"sub/" if slide_id == "s2" else ""}{slide_id}.tif'
        index = tile_index.read(tile_index.index_file(out, slide_id), storage.version(path)[0])
        assert 0 in index.levels
    # Nothing staged stays behind, and a rerun reuses every tiled slide from the bucket.
    before = storage.read_bytes(storage.join(out, 'slides.csv'))
    calls = []
    real = tiling.tile_slide

    def counted(entry, *a):
        calls.append(entry.slide_id)
        return real(entry, *a)
    tiling.tile_slide = counted
    try:
        tiling.tile_slides(tiling.list_slides(url), params(), out)
    finally:
        tiling.tile_slide = real
    assert calls == ['zz_broken']
    assert storage.read_bytes(storage.join(out, 'slides.csv')) == before


def test_two_hosts_merge_into_one_hosts_table_and_a_rerun_redoes_only_the_unfinished(
        slide_folder, bucket, monkeypatch):
    url = uploaded(slide_folder, bucket)
    entries = tiling.list_slides(url)
    one = storage.join(bucket, 'one')
    tiling.tile_slides(entries, params(), one)
    assert [sorted(s) for s in tiling.host_shares([e.slide_id for e in entries], 2)] == \
        [['s1', 's3', 'zz_broken'], ['s2', 's4']]

    split = storage.join(bucket, 'split')
    real, calls = tiling.tile_slide, []

    def interrupted(entry, *a):   # host 1 is stopped at its second slide
        calls.append(entry.slide_id)
        if entry.slide_id == 's2':
            raise KeyboardInterrupt
        return real(entry, *a)
    monkeypatch.setattr(tiling, 'tile_slide', interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiling.tile_slides(entries, params(), split, host_index=1, host_count=2)
    assert [r['slide_id'] for r in slides_csv.read_rows(split, 'slides-1-of-2.csv')] == ['s4']

    monkeypatch.setattr(tiling, 'tile_slide', lambda entry, *a: calls.append(entry.slide_id)
                        or real(entry, *a))
    mine = tiling.tile_slides(entries, params(), split, host_index=0, host_count=2)
    assert sorted(r['slide_id'] for r in mine) == ['s1', 's3', 'zz_broken']
    assert not slides_csv.has_table(split)   # host 1's share is not finished: no merge yet
    merged = tiling.tile_slides(entries, params(), split, host_index=1, host_count=2)
    assert calls == ['s4', 's2', 's1', 's3', 'zz_broken', 's2']   # s4 was not tiled again
    assert storage.read_bytes(storage.join(split, 'slides.csv')) == \
        storage.read_bytes(storage.join(one, 'slides.csv'))
    assert merged == slides_csv.read_rows(one)
    assert_same_tiling(split, one, ['s1', 's2', 's3', 's4'], same_where=True)


def test_a_failed_version_lookup_is_the_slides_row_not_a_silent_retiling(
        slide_folder, bucket, monkeypatch):
    """During an outage a rerun cannot tell whether a slide changed: its row says so
    (unreadable, with the error) rather than tiling every slide anew."""
    from clusiam_jax.errors import DataError
    url = uploaded(slide_folder, bucket)
    out = storage.join(bucket, 'out')
    entries = tiling.list_slides(url)
    tiling.tile_slides(entries, params(), out)

    def outage(path):
        raise DataError(f'cannot look up {path}: 503 Service Unavailable')
    version = storage.version
    monkeypatch.setattr(storage, 'version', outage)
    calls = []
    real = tiling.tile_slide
    monkeypatch.setattr(tiling, 'tile_slide', lambda entry, *a: calls.append(entry.slide_id)
                        or real(entry, *a))
    with pytest.raises(DataError, match='no slide could be tiled'):
        tiling.tile_slides(entries, params(), out)
    assert calls == ['zz_broken']   # never tiled: no coordinate file to compare
    rows = {r['slide_id']: r for r in slides_csv.read_rows(out)}
    for slide_id in ('s1', 's2', 's3', 's4'):
        assert rows[slide_id]['status'] == slides_csv.UNREADABLE
        assert '503 Service Unavailable' in rows[slide_id]['reason']
    monkeypatch.setattr(storage, 'version', version)   # the store is back: all reused
    rows = {r['slide_id']: r for r in tiling.tile_slides(entries, params(), out)}
    assert calls == ['zz_broken'] * 2
    assert all(rows[s]['status'] == slides_csv.TILED for s in ('s1', 's2', 's3', 's4'))


def test_tile_command_with_slides_and_output_in_buckets(slide_folder, bucket, capsys):
    url = uploaded(slide_folder, bucket)
    listed = storage.join(bucket, 'list.csv')   # a CSV in the bucket, paths relative to it
    storage.write_bytes(listed, b'path,label\nslides/s1.tif,a\nslides/sub/s2.tif,b\n')
    out = storage.join(bucket, 'tiling')
    args = ['--mode', 'tile', f'--config.tile.slides={listed}', f'--config.tile.out_dir={out}',
            '--config.tile.patch_size=64', '--config.tile.target_mpp=1.0',
            '--config.tile.tissue_mpp=4.0', '--config.tile.min_area_um2=1000',
            '--config.tile.num_workers=0']
    assert cli.main(args) == 0
    rows = slides_csv.read_rows(out)
    assert [(r['slide_id'], r['path'], r['label'], r['status']) for r in rows] == [
        ('s1', f'{url}/s1.tif', 'a', 'tiled'), ('s2', f'{url}/sub/s2.tif', 'b', 'tiled')]
    split = [a.replace(out, storage.join(bucket, 'split')) for a in args]
    for host in (0, 1):   # each host runs the same command with its own index
        assert cli.main(split + ['--config.tile.host_count=2',
                                 f'--config.tile.host_index={host}']) == 0
    assert storage.read_bytes(storage.join(bucket, 'split', 'slides.csv')) == \
        storage.read_bytes(storage.join(out, 'slides.csv'))
    assert cli.main(args + ['--config.tile.host_count=2', '--config.tile.host_index=2']) == 2
    assert 'tile.host_index must be below tile.host_count' in capsys.readouterr().err


def test_several_file_slides_in_a_bucket_are_listed_as_on_disk_and_staged_whole(
        bucket, tmp_path):
    root = tmp_path / 'wsi'
    for rel in ('case/1.dcm', 'case/2.dcm', 'm.mrxs', 'm/Index.dat', 'm/Data0.dat', 'x.svs',
                'x.vms', '.git/y.svs', 'r.txt'):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b'not a slide')
    url = uploaded(str(root), bucket)
    local, skipped = listing.find_slides(str(root))
    found, skipped_there = listing.find_slides(url)
    assert skipped_there == skipped == {'.txt': 1}
    assert [(e.slide_id, e.path.replace(str(root), url)) for e in local] == \
        [(e.slide_id, e.path) for e in found] == [
            ('case', f'{url}/case/1.dcm'), ('m', f'{url}/m.mrxs'), ('x', f'{url}/x.svs'),
            ('x', f'{url}/x.vms')]
    with listing.staged(f'{url}/m.mrxs') as staged:   # with its data folder
        assert sorted(os.listdir(os.path.dirname(staged))) == ['m', 'm.mrxs']
        assert sorted(os.listdir(os.path.join(os.path.dirname(staged), 'm'))) == \
            ['Data0.dat', 'Index.dat']
    assert not os.path.exists(staged)
    out = storage.join(bucket, 'tiling')
    reasons = [tiling.tile_slide(e, params(), out)['reason'] for e in found]
    assert [r.split(': ')[:2] for r in reasons[:3]] == [
        [e.path, 'not a readable slide (OpenSlideUnsupportedFormatError'] for e in found[:3]]
    assert reasons[3].startswith(f'{url}/x.vms: a VMS/VMU slide')


def test_a_dicom_folder_in_a_bucket_is_tiled_as_on_disk(bucket, tmp_path):
    pytest.importorskip('pydicom')
    from tests.test_tile_listing import synthetic_base, write_dicom_slide
    root = tmp_path / 'wsi'
    write_dicom_slide(str(root / 'HE-slide'), synthetic_base(1.0), 1.0)
    url = uploaded(str(root), bucket)
    entries = tiling.list_slides(url)
    # The bucket's listing cannot tell a level from the report: the first instance by name.
    assert [(e.slide_id, e.path) for e in entries] == [('HE-slide', f'{url}/HE-slide/0_report.dcm')]
    out, local_out = storage.join(bucket, 'tiling'), str(tmp_path / 'out')
    tiling.tile_slides(entries, params(), out)
    tiling.tile_slides(tiling.list_slides(str(root)), params(), local_out)
    assert [r['status'] for r in slides_csv.read_rows(out)] == ['tiled']
    assert_same_tiling(out, local_out, ['HE-slide'])


def test_two_hosts_on_a_shared_disk_merge_into_one_hosts_table(slide_folder, tmp_path):
    entries = tiling.list_slides(slide_folder)
    one, split = str(tmp_path / 'one'), str(tmp_path / 'split')
    assert tiling.tile_slides(entries, params(), one) == \
        [dict(r, n_patches=int(r['n_patches'])) for r in slides_csv.read_rows(one)]
    for host in (1, 0):
        tiling.tile_slides(entries, params(), split, host_index=host, host_count=2)
    with open(os.path.join(split, 'slides.csv'), 'rb') as a, \
            open(os.path.join(one, 'slides.csv'), 'rb') as b:
        assert a.read() == b.read()
    assert sorted(os.listdir(split)) == ['masks', 'patches', 'slides-0-of-2.csv',
                                         'slides-1-of-2.csv', 'slides.csv']
    assert_same_tiling(split, one, ['s1', 's2', 's3', 's4'], same_where=True)
