"""Slides staged from a bucket (issue 25): a tile index is only used for the object it was
written from (ETag), a slide's sidecars are part of the slide cache's key, what a killed
process staged is removed by the next one of its host, a slide without an index is told once,
and the slide cache stages a several-file slide as the tiling does (listing.stage_into).
Against both loopback servers (tests/objstore.py).
"""
import logging
import os
import socket
import subprocess
import tempfile

import numpy as np
import pytest

from clusiam_jax import fileio, storage
from clusiam_jax.config import default_config
from clusiam_jax.data import slide_cache, sources, stats
from clusiam_jax.slides import listing, reader, tile_index, tiling
from tests.helpers import synthetic_tissue, write_pyramid


def _params():
    c = default_config().tile
    c.patch_size, c.target_mpp, c.tissue_mpp, c.min_area_um2 = 64, 1.0, 4.0, 1000.0
    return tiling.TileParams.from_config(c)


def _dead_pid() -> int:
    proc = subprocess.Popen(['true'])
    proc.wait()
    return proc.pid


@pytest.fixture
def tiled_slide(bucket, tmp_path):
    """(the slide's URL, its index's URL, the tiling folder) of one pyramid tiled in the
    bucket."""
    local = tmp_path / 'wsi'
    local.mkdir()
    write_pyramid(str(local / 'a.tif'), synthetic_tissue(288, 384, [(120, 100, 90)], seed=3),
                  1.0)
    url = storage.join(bucket, 'slides')
    storage.upload(str(local), url, recursive=True)
    out = storage.join(bucket, 'tiling')
    rows = tiling.tile_slides(tiling.list_slides(url), _params(), out)
    assert [r['status'] for r in rows] == ['tiled'], rows
    return storage.join(url, 'a.tif'), tile_index.index_file(out, 'a'), out


def test_a_slide_written_again_with_its_size_is_not_read_through_its_old_index(
        tiled_slide, tmp_path):
    url, index_url, _ = tiled_slide
    size, etag = storage.version(url)
    assert etag and tile_index.read(index_url, size, etag).etag == etag
    data = storage.read_bytes(url)
    storage.write_bytes(url, data[:-1] + bytes([data[-1] ^ 0xFF]))   # same byte count
    assert storage.version(url)[0] == size
    with pytest.raises(reader.SlideError, match='written again'):
        slide_cache.open_remote_slide(url, index_url, slide_cache.SlideCache(str(tmp_path / 'c')))


def test_a_slide_without_an_index_is_told_once_and_staged_whole(tiled_slide, tmp_path,
                                                                 caplog, monkeypatch):
    url, index_url, _ = tiled_slide
    storage.remove(index_url)
    monkeypatch.setattr(slide_cache, '_unindexed_warned', set())
    cache = slide_cache.SlideCache(str(tmp_path / 'c'))
    with caplog.at_level(logging.WARNING, logger='clusiam_jax'):
        for _ in range(3):
            slide_cache.open_remote_slide(url, index_url, cache).close()
    told = [r.getMessage() for r in caplog.records if 'no tile index' in r.getMessage()]
    assert len(told) == 1 and told[0].startswith(f'{url}: no tile index (none at {index_url})')
    assert (cache.misses, cache.hits) == (1, 2)


def test_a_changed_sidecar_is_staged_again(bucket, tmp_path, monkeypatch):
    """A MIRAX slide's data folder is part of the key: a changed data file is a new entry."""
    url = storage.join(bucket, 'slides')
    storage.write_bytes(storage.join(url, 'm.mrxs'), b'index')
    storage.write_bytes(storage.join(url, 'm', 'Data0.dat'), b'old tiles')
    slide = storage.join(url, 'm.mrxs')
    cache = slide_cache.SlideCache(str(tmp_path / 'c'))

    def data_file():
        local = cache.open(slide, storage.version(slide), lambda p: p)
        with open(os.path.join(os.path.dirname(local), 'm', 'Data0.dat'), 'rb') as f:
            return f.read()
    assert data_file() == b'old tiles'
    data = storage.join(url, 'm', 'Data0.dat')
    assert listing.sidecars(slide) == {'m/Data0.dat': storage.version(data)}
    heads = []
    monkeypatch.setattr(storage, 'version', lambda u, _real=storage.version: heads.append(u)
                        or _real(u))
    assert data_file() == b'old tiles'
    assert (cache.misses, cache.hits) == (1, 1) and heads == [slide]   # the sidecars: listed
    storage.write_bytes(storage.join(url, 'm', 'Data0.dat'), b'new tiles')
    assert data_file() == b'new tiles' and cache.misses == 2


def test_a_dicom_folder_staged_by_the_cache_opens_as_the_tilings_copy(bucket, tmp_path):
    pytest.importorskip('pydicom')
    from tests.test_tile_listing import synthetic_base, write_dicom_slide
    root = tmp_path / 'wsi'
    write_dicom_slide(str(root / 'HE-slide'), synthetic_base(1.0), 1.0)
    url = storage.join(bucket, 'slides')
    storage.upload(str(root), url, recursive=True)
    [entry] = tiling.list_slides(url)   # the first instance by name: the report
    cache = slide_cache.SlideCache(str(tmp_path / 'c'))
    cached = cache.open(entry.path, storage.version(entry.path), lambda p: p)
    with listing.staged(entry.path) as staged:
        assert os.path.relpath(staged, os.path.dirname(os.path.dirname(staged))) == \
            os.path.relpath(cached, os.path.dirname(os.path.dirname(cached))) == \
            os.path.relpath(reader.dicom_file(str(root / 'HE-slide')), str(root))
        with reader.open_slide(staged) as a, reader.open_slide(cached) as b:
            assert a.dimensions == b.dimensions
            np.testing.assert_array_equal(a.read(0, 0, 0, 64, 64), b.read(0, 0, 0, 64, 64))


def test_what_a_killed_process_staged_is_removed_by_the_next_one(bucket, tmp_path,
                                                                 monkeypatch):
    url = storage.join(bucket, 's.tif')
    storage.write_bytes(url, b'slide bytes')
    host, dead = socket.gethostname(), _dead_pid()
    # The slide cache: this host's dead process's staging folder goes, a live one's and
    # another host's (recent) stay.
    folder = tmp_path / 'c'
    folder.mkdir()
    names = {f'.staging-{dead}@{host}@x1': False, f'.staging-{os.getppid()}@{host}@x2': True,
             f'.staging-{dead}@{host}-2@x3': True}   # another host's name begins with ours
    for name in names:
        (folder / name).mkdir()
        (folder / name / 's.tif').write_bytes(b'partial')
    cache = slide_cache.SlideCache(str(folder))
    assert open(cache.open(url, storage.version(url), lambda p: p), 'rb').read() == b'slide bytes'
    assert {n: os.path.isdir(folder / n) for n in names} == names
    staging = [n for n in os.listdir(folder) if n.startswith('.staging-')]
    assert sorted(staging) == sorted(n for n, kept in names.items() if kept)

    # The tiling's staged copies: one folder per process under one parent.
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))
    monkeypatch.setattr(listing, '_cleaned', set())
    parent = tmp_path / 'tmp' / listing.STAGING_PARENT
    (parent / f'{dead}@{host}' / 'x').mkdir(parents=True)
    (parent / f'{dead}@{host}' / 'x' / 's.tif').write_bytes(b'partial')
    (parent / f'{os.getppid()}@{host}').mkdir()
    with listing.staged(url) as local:
        assert local.startswith(str(parent / f'{os.getpid()}@{host}') + os.sep)
        assert open(local, 'rb').read() == b'slide bytes'
    assert not os.path.exists(local)
    assert sorted(os.listdir(parent)) == sorted([f'{os.getppid()}@{host}',
                                                 f'{os.getpid()}@{host}'])


def test_every_cache_is_under_one_root(monkeypatch, tmp_path):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    root = str(tmp_path / 'xdg' / 'clusiam_jax')
    assert fileio.cache_root() == root
    assert slide_cache.SlideCache().folder == os.path.join(root, 'slides')
    assert os.path.dirname(stats.cache_file('/data/x')) == os.path.join(root, 'stats')
    monkeypatch.setattr(sources, '_staged', lambda local, versions: True)
    monkeypatch.setattr(storage, 'find_files', lambda url: [])
    assert sources.stage_dataset('s3://b/ds').startswith(os.path.join(root, 'datasets') + os.sep)
