"""The train loader reads slides in a bucket ahead across its batch boundaries (issue 25): each
worker names the next patches it will load from the epoch plan (its own batches, as grain's
mp_prefetch deals them out), so the next batch's patches are fetched before they are asked
for; the pixels of every batch stay those of local disk (0 and 2 grain workers: also
test_storage_slides' train-batches test). A read's tiles that are neighbours in the file come
in one ranged request, with the same pixels."""
import numpy as np
import pytest

from clusiam_jax import data, storage
from clusiam_jax.data import epoch_plan, pipeline
from clusiam_jax.slides import reader, remote_tiles, tile_index
from tests.helpers import MEAN, STD, count_range_reads, data_config, synthetic_tissue, write_pyramid
from tests.test_storage_slides import slide_folder, tiled  # noqa: F401  (fixtures)


@pytest.mark.parametrize('stride', [1, 2, 3])
@pytest.mark.parametrize('start', [0, 1])
def test_next_elements_follow_the_batches_grain_deals_a_worker(stride, start):
    """grain's mp_prefetch slices the batched stream: worker w gets batches w, w + N, ..."""
    import grain
    plan = epoch_plan.EpochPlan(num_records=40, global_batch=4, process_index=0,
                                process_count=1, num_epochs=2, seed=0)
    pm = pipeline.PairMaker(None, plan, None, None, stride=stride)
    b, end = plan.local_batch, 2 * plan.steps_per_epoch * plan.local_batch
    batches = grain.MapDataset.range(start * b, end).batch(b, drop_remainder=True)
    for worker in range(stride):
        mine = [int(k) for batch in batches.slice(slice(worker, None, stride))
                for k in batch]
        for i, k in enumerate(mine):
            assert pm.next_elements(k, 9) == mine[i + 1:i + 10], (worker, k)


@pytest.mark.parametrize('workers', [0, 2])
def test_the_next_batch_is_fetched_before_it_is_asked_for(tiled, tmp_path,  # noqa: F811
                                                          monkeypatch, workers):
    out, local = tiled
    reads = count_range_reads(monkeypatch)
    loader = data.create_train_loader(data_config(out, batch=4, workers=workers, mean=MEAN,
                                                  std=STD, cache_dir=str(tmp_path / 'c')))
    on_disk = data.create_train_loader(data_config(out, batch=4, slide_dir=local, mean=MEAN,
                                                   std=STD))
    pm, reference = loader.pair_maker(), on_disk.pair_maker()
    assert pm.stride == max(1, workers)
    source = loader.source
    direct = {i for i, s in enumerate(source.slides) if s.slide_id in ('a', 'c')}
    b, stride = loader.plan.local_batch, pm.stride

    def by_range(k):   # a's and c's patches are read by byte ranges
        return int(source.slide_index[pm.record_index(k)[2]]) in direct

    # The last patch of a batch names the worker's next batch, `stride` batches on.
    last = next(k for k in range(b - 1, 40 * b, b)
                if any(by_range(j) for j in range(k + 1 + (stride - 1) * b, k + 1 + stride * b)))
    ahead = pm.next_elements(last, pipeline._PREFETCH_AHEAD)
    assert ahead[:b] == list(range(last + 1 + (stride - 1) * b, last + 1 + stride * b))
    got = pm(last)
    source._pool.shutdown(wait=True)
    fetched = len(reads)
    for k in ahead[:b]:   # the next batch: no request left to make
        if by_range(k):
            source.load(pm.record_index(k)[2])
    assert len(reads) == fetched, 'the next batch was not read ahead'
    # The same pixels as local disk, with the read-ahead and without.
    source._pool = None
    want = reference(last)
    for key in ('view1', 'view2'):
        np.testing.assert_array_equal(got[key], want[key])
    for k in ahead:
        got, want = pm(k), reference(k)
        for key in ('view1', 'view2'):
            np.testing.assert_array_equal(got[key], want[key])


def test_a_loaded_patch_is_read_ahead_again_in_its_next_epoch(tiled, tmp_path,  # noqa: F811
                                                              monkeypatch):
    """prefetch asks for an index once until it is loaded: a small data set's next epoch
    reads its patches ahead again (their tiles long evicted from the tile cache)."""
    out, _ = tiled
    reads = count_range_reads(monkeypatch)
    source = data.create_train_loader(data_config(
        out, batch=4, mean=MEAN, std=STD, cache_dir=str(tmp_path / 'c'))).source
    index = next(i for i in range(len(source))
                 if source.slides[source.slide_index[i]].slide_id == 'a')
    for epoch in range(2):
        source.prefetch([index])
        source.prefetch([index])   # under way: not asked twice
        source._pool.shutdown(wait=True)
        source._pool = None
        fetched = len(reads)
        assert fetched == epoch + 1
        source.load(index)
        assert len(reads) == fetched, 'read ahead, then read again'
        source._tiles._tiles.clear()   # evicted before the next epoch


def test_merged_ranges_join_neighbours_at_most_the_gap_apart():
    ranges = [(300, 400), (0, 100), (100, 200), (264, 300), (200 + 64, 250), (1000, 1010)]
    spans, where = remote_tiles.merged_ranges(ranges, 64)
    assert spans == [(0, 400), (1000, 1010)]
    data = bytes(range(256)) * 4 + bytes(range(10))
    got = [data[slice(*spans[m])][at:at + end - start]
           for (start, end), (m, at) in zip(ranges, where)]
    assert got == [data[start:end] for start, end in ranges]
    assert remote_tiles.merged_ranges(ranges, 63)[0] == [(0, 200), (264, 400), (1000, 1010)]
    assert remote_tiles.merged_ranges(ranges, -1)[0] == sorted(ranges)


def test_neighbouring_tiles_come_in_one_request_with_the_same_pixels(tmp_path, monkeypatch):
    side = 1024
    rgb = synthetic_tissue(side, side, [(side * 0.5, side * 0.5, side * 0.4)], seed=3)
    path = write_pyramid(str(tmp_path / 's.tif'), rgb, 0.5)
    with open(path, 'rb') as f:
        index = tile_index.build(f, name=path)
    rng = np.random.default_rng(0)
    requests = {}
    with reader.open_slide(path) as local:
        levels = sorted(set(local.tiles.levels) & set(index.levels))   # the direct reads'
        assert levels
        regions = [(level, int(x), int(y), 224, 224) for level in levels
                   for x, y in rng.integers(0, side - 224, (20, 2))]
        for gap in (-1, remote_tiles.MERGE_GAP):
            calls = []

            def counting(p, ranges, calls=calls):
                calls.append(len(ranges))
                return storage.read_ranges(p, ranges)
            monkeypatch.setattr(remote_tiles, 'MERGE_GAP', gap)
            remote = remote_tiles.RemoteTiles(index, path, counting, cached_tiles=0)
            for region in regions:
                np.testing.assert_array_equal(remote.read(*region), local.tiles.read(*region))
            requests[gap] = sum(calls)
    assert requests[remote_tiles.MERGE_GAP] < 0.75 * requests[-1], requests
