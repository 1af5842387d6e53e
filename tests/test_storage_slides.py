"""Training and export read patches from slides in a bucket (issue 25): a slide with a tile
index is laid out as the local Slide of the same file, its directly read levels fetched by
byte ranges, its OpenSlide-read levels (and slides without an index) from the slide staged
whole into a bounded LRU cache; every patch and every batch equals reading the slides from
local disk. Against both loopback servers (tests/objstore.py).
"""
import json
import os
import threading

import numpy as np
import pytest

from clusiam_jax import data, storage
from clusiam_jax.config import default_config
from clusiam_jax.data import slide_cache, slide_source
from clusiam_jax.errors import DataError
from clusiam_jax.slides import reader, remote_tiles, tile_index, tiling
from tests.helpers import (
    MEAN,
    STD,
    count_range_reads,
    data_config,
    mesh_of,
    synthetic_tissue,
    take,
    write_ome_pyramid,
    write_pyramid,
)

# (file, level-0 µm/px, writer): at 1 µm/px patches, a and d read level 0 (direct), b reads
# OpenSlide's level 1 (staged), c reads the OME SubIFD level 1 (direct); d's index is removed.
SLIDES = [('a.tif', 1.0, write_pyramid), ('b.tif', 0.5, write_pyramid),
          ('c.ome.tif', 0.5, write_ome_pyramid), ('d.tif', 1.0, write_pyramid)]


@pytest.fixture(scope='module')
def slide_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('wsi')
    for i, (name, mpp, writer) in enumerate(SLIDES):
        side = int(384 / mpp)
        rgb = synthetic_tissue(side * 3 // 4, side, [(side * 0.3, side * 0.3, side * 0.25),
                                                     (side * 0.7, side * 0.5, side * 0.2)],
                               seed=i)
        writer(str(root / name), rgb, mpp)
    return str(root)


def _params():
    c = default_config().tile
    c.patch_size, c.target_mpp, c.tissue_mpp, c.min_area_um2 = 64, 1.0, 4.0, 1000.0
    return tiling.TileParams.from_config(c)


@pytest.fixture
def tiled(slide_folder, bucket):
    """(the tiling in the bucket of the slides in the bucket, the local slide folder)."""
    url = storage.join(bucket, 'slides')
    storage.upload(slide_folder, url, recursive=True)
    out = storage.join(bucket, 'tiling')
    rows = tiling.tile_slides(tiling.list_slides(url), _params(), out)
    assert [r['status'] for r in rows] == ['tiled'] * 4, rows
    storage.remove(tile_index.index_file(out, 'd'))
    return out, slide_folder


def batches_equal(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True)
               for k in ('view1', 'view2'))


def _sources(tiled, cache_dir, cache_gb=1.0):
    out, local = tiled
    remote = slide_source.open_slide_source(out, cache_dir=str(cache_dir), cache_gb=cache_gb)
    on_disk = slide_source.open_slide_source(out, slide_dir=local)
    assert [s.path for s in remote.slides] == [storage.join(storage.split(out)[0], 'slides', n)
                                               for n, _, _ in SLIDES]
    assert all(not storage.is_url(s.path) for s in on_disk.slides)
    return remote, on_disk


def test_every_patch_from_the_bucket_equals_local_disk(tiled, tmp_path, monkeypatch):
    monkeypatch.setattr(slide_source, 'REMOTE_TILES', 5)   # one decoded-tile LRU, tiny
    remote, on_disk = _sources(tiled, tmp_path / 'cache')
    calls = []
    for name in ('read_bytes', 'open_header', 'download', 'local_copy', 'read_ranges'):
        real = getattr(storage, name)

        def counted(path, *a, _real=real, _name=name, **k):
            calls.append((_name, path, a))
            return _real(path, *a, **k)
        monkeypatch.setattr(storage, name, counted)

    for index in range(len(remote)):
        np.testing.assert_array_equal(remote.load(index), on_disk.load(index), str(index))
    assert 0 < len(remote._tiles) <= 5   # all the slides' tiles together

    by_id = {s.slide_id: remote._handle(i) for i, s in enumerate(remote.slides)}
    size0 = {s.slide_id: remote._patch_sizes(i, by_id[s.slide_id])[0]
             for i, s in enumerate(remote.slides)}
    chosen = {k: slide.best_level(size0[k] / 64) for k, slide in by_id.items()}
    assert chosen == {'a': 0, 'b': 1, 'c': 1, 'd': 0}
    # a and c: every level read by byte ranges; b: level 1 through the staged copy; d: staged.
    assert isinstance(by_id['a'].levels[0].backend, remote_tiles.RemoteTiles)
    assert isinstance(by_id['c'].levels[1].backend, remote_tiles.RemoteTiles)
    assert by_id['b'].levels[1].backend is by_id['b'] and by_id['b']._staged is not None
    assert not isinstance(by_id['d'], reader.RemoteSlide)
    for k in ('a', 'b', 'c', 'd'):   # the local Slide's level list, exactly
        with reader.open_slide(os.path.join(tiled[1], remote.slides[
                'abcd'.index(k)].path.rsplit('/', 1)[1])) as local:
            assert [(lv.downsample, lv.size, lv.tile) for lv in by_id[k].levels] == \
                [(lv.downsample, lv.size, lv.tile) for lv in local.levels]
    # Two slides staged whole (b, d); a's and c's bytes came only as their tiles' ranges.
    assert len(os.listdir(tmp_path / 'cache')) == 3   # two entries and the lock
    for slide_id in ('a', 'c'):
        url = remote.slides['abcd'.index(slide_id)].path
        index = by_id[slide_id].tiles.index
        tiles = {(int(o), int(o + c)) for lv in index.levels.values()
                 for o, c in zip(lv.offsets, lv.counts)}
        mine = [c for c in calls if c[1] == url]
        assert mine and all(name == 'read_ranges' for name, _, _ in mine), mine
        starts, ends = {a for a, _ in tiles}, {b for _, b in tiles}   # neighbours joined
        assert all(a in starts and b in ends for _, _, (ranges,) in mine for a, b in ranges)


def test_train_batches_from_the_bucket_equal_local_disk(tiled, tmp_path, monkeypatch):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from clusiam_jax.train import prefetch
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))   # the default cache_dir
    out, local = tiled
    sharding = NamedSharding(mesh_of(8), PartitionSpec('data'))
    assert len(jax.devices()) == 8
    expected = take(data.create_train_loader(data_config(
        out, batch=8, slide_dir=local, mean=MEAN, std=STD)).iterator(), 4)
    for workers in (0, 2):
        it = data.create_train_loader(data_config(
            out, batch=8, workers=workers, mean=MEAN, std=STD)).iterator()
        got = take(it, 4)
        it.close()
        for a, b in zip(got, expected):
            for k in ('view1', 'view2'):
                on_device = prefetch.to_device(a, {'view1': sharding, 'view2': sharding})[k]
                np.testing.assert_array_equal(np.asarray(on_device), b[k])
    assert os.listdir(tmp_path / 'xdg' / 'clusiam_jax' / 'slides')
    # Resumed mid-epoch from a saved position: the local run's next batches.
    it = data.create_train_loader(data_config(out, batch=8, mean=MEAN, std=STD)).iterator()
    it.set_state(json.loads(json.dumps({'batches_drawn': 2})))
    assert batches_equal(take(it, 2), expected[2:4])
    # Two processes' shares from the bucket assemble the one-process batch from local disk.
    shares = [take(data.create_train_loader(data_config(out, batch=8, mean=MEAN, std=STD),
                                            process_index=p, process_count=2).iterator(), 2)
              for p in range(2)]
    for step in range(2):
        for k in ('view1', 'view2'):
            np.testing.assert_array_equal(
                np.concatenate([shares[0][step][k], shares[1][step][k]]), expected[step][k])


def test_cache_stays_under_its_size_and_evicts_the_least_recently_opened(
        slide_folder, bucket, tmp_path):
    url = storage.join(bucket, 'slides')
    storage.upload(slide_folder, url, recursive=True)
    urls = {n: storage.join(url, n) for n, _, _ in SLIDES}
    sizes = {n: os.path.getsize(os.path.join(slide_folder, n)) for n in urls}
    # Room for c and one of a, d, never all three.
    limit = sizes['c.ome.tif'] + max(sizes['a.tif'], sizes['d.tif']) + sizes['a.tif'] // 2
    cache = slide_cache.SlideCache(str(tmp_path / 'c'), limit)

    def stage(name):
        local = cache.open(urls[name], storage.version(urls[name]), lambda p: p)
        with open(local, 'rb') as f:
            assert f.read() == open(os.path.join(slide_folder, name), 'rb').read()
        assert cache.used_bytes() <= limit
        return local

    first = stage('a.tif')
    stage('d.tif')
    assert (cache.hits, cache.misses) == (0, 2)
    assert stage('a.tif') == first and cache.hits == 1   # a opened again: d is now the oldest
    stage('c.ome.tif')
    assert os.path.exists(first), 'the recently opened slide was evicted'
    assert sorted(os.path.basename(os.path.join(cache.folder, e, os.listdir(
        os.path.join(cache.folder, e))[0])) for e in cache._entries()) == ['a.tif', 'c.ome.tif']
    with pytest.raises(DataError, match='more than the whole slide cache'):
        slide_cache.SlideCache(str(tmp_path / 'tiny'), 1000).open(
            urls['b.tif'], storage.version(urls['b.tif']), lambda p: p)

    # Threads (as processes would) staging one slide at once: one entry, each gets a whole file.
    shared = slide_cache.SlideCache(str(tmp_path / 'shared'), limit)
    found = []
    threads = [threading.Thread(target=lambda: found.append(shared.open(
        urls['a.tif'], storage.version(urls['a.tif']), lambda p: open(p, 'rb').read())))
        for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(shared._entries()) == 1 and len(found) == 4
    assert all(f == open(os.path.join(slide_folder, 'a.tif'), 'rb').read() for f in found)
    assert not [n for n in os.listdir(shared.folder) if n.startswith('.staging-')]


def test_a_failed_bucket_read_is_a_skipped_patch_not_a_fallback_level(tiled, tmp_path,
                                                                      monkeypatch):
    """A hidden level whose tile is damaged falls back to OpenSlide's levels (other pixels,
    said once); a bucket read that failed after its retries must not: the patch is skipped."""
    from clusiam_jax.data import image_io
    remote, _ = _sources(tiled, tmp_path / 'cache')
    c = next(i for i in range(len(remote)) if remote.slides[remote.slide_index[i]].slide_id == 'c')
    remote.load(c)

    def failing(path, ranges):
        raise storage.Unreadable(f'cannot read {path}: 503 Slow Down')
    handle = remote._handle(int(remote.slide_index[c]))
    monkeypatch.setattr(handle.tiles, '_read_ranges', failing)
    handle.tiles.close()   # no cached tiles
    with pytest.raises(image_io.BadImageError, match='503 Slow Down'):
        remote.load(c)
    assert not handle._hidden_failed and len(handle.levels) > handle.listed


def test_prefetched_patches_load_without_another_request(tiled, tmp_path, monkeypatch):
    """prefetch reads the tiles of the patches a worker reads next in background threads;
    load() then finds them (cached, or awaits the fetch under way) and asks for nothing."""
    remote, on_disk = _sources(tiled, tmp_path / 'cache')
    direct = [i for i in range(len(remote)) if remote.slides[remote.slide_index[i]].slide_id
              in ('a', 'c')]
    reads = count_range_reads(monkeypatch)
    remote.prefetch(direct[:3])
    remote.load(direct[0])     # may meet its own prefetch under way: waits for it
    remote.prefetch(direct)
    remote._pool.shutdown(wait=True)
    asked = len(reads)
    assert asked and len(reads) <= len(direct)
    for i in direct:
        np.testing.assert_array_equal(remote.load(i), on_disk.load(i))
    assert len(reads) == asked, 'a prefetched patch was read again'
    # b's patches need its staged copy: prefetch stages it ahead of the first load.
    b = [i for i in range(len(remote)) if remote.slides[remote.slide_index[i]].slide_id == 'b']
    remote._pool = None
    remote.prefetch(b[:1])
    remote._pool.shutdown(wait=True)
    assert remote._handles[int(remote.slide_index[b[0]])]._staged is not None
    np.testing.assert_array_equal(remote.load(b[0]), on_disk.load(b[0]))
