"""Object storage, the corners: the bucket lock released only while it is still ours, a lost
lease that stops training with nothing more written, an outage under a gs:// dataset that
ends the run instead of skipping records, and object versions that do not change with an
object's metadata (tests/objstore.py's loopback servers, bench/objstore_proxy's faults)."""
import contextlib
import json
import os
import pickle
import threading
import time

import numpy as np
import pytest

from bench.objstore_proxy import FaultProxy
from clusiam_jax import data, interrupts, storage, workdir_lock
from clusiam_jax.data import image_io, sources
from clusiam_jax.errors import ConfigError, DataError
from tests import helpers
from tests.objstore import clear_fs_cache, routed
from tests.test_storage_dataset import _built_in_bucket, _shards, patches  # noqa: F401
from tests.test_storage_faults import _no_gcsfs_backoff


def _theirs() -> bytes:
    """The lock object of another command, on another host, renewed just now."""
    return json.dumps({'host': 'another-vm', 'pid': 1, 'token': 'theirs',
                       'renewed': time.time()}).encode()


# ---------------------------------------------------------------- releasing the lock

def _spy_gcs_calls(monkeypatch):
    """[(method, path, args, params)] of every request gcsfs makes from here on."""
    import fsspec.asyn
    import gcsfs
    calls, real = [], gcsfs.GCSFileSystem._call

    async def spy(self, method, path, *args, **kwargs):
        calls.append((method, path, args, dict(kwargs)))
        return await real(self, method, path, *args, **kwargs)
    monkeypatch.setattr(gcsfs.GCSFileSystem, '_call', spy)
    monkeypatch.setattr(gcsfs.GCSFileSystem, 'call', fsspec.asyn.sync_wrapper(spy))
    clear_fs_cache()   # instances made before keep what they bound
    return calls


@pytest.mark.parametrize('scheme', ['s3', 'gs'])
def test_release_leaves_a_lock_taken_over_while_it_released(scheme, objstore, monkeypatch):
    """Another command takes the lock over between release's look at it and its delete (this
    one stalled there past its lease): the delete names the version looked at, so the store
    refuses it (moto enforces S3's If-Match on DELETE) and the other command's lock stays.
    fake-gcs-server ignores ifGenerationMatch on DELETE (measured), so for gs:// the test
    checks that the delete names the generation release looked at, which GCS enforces."""
    folder = objstore.new_bucket(scheme) + '/run'
    url = f'{folder}/{workdir_lock.LOCK_NAME}'
    calls = _spy_gcs_calls(monkeypatch) if scheme == 'gs' else None
    lock = workdir_lock.BucketLock(folder, '--workdir').acquire()
    ours = objstore.fs(scheme).info(url)
    real, taken = storage.read_bytes, []

    def taken_as_it_looks(path):
        got = real(path)
        if path == url and threading.current_thread() is threading.main_thread() and not taken:
            taken.append(True)
            objstore.fs(scheme).pipe_file(url, _theirs())
        return got
    monkeypatch.setattr(storage, 'read_bytes', taken_as_it_looks)
    lock.release()
    monkeypatch.setattr(storage, 'read_bytes', real)
    assert taken, 'release never looked at its lock'
    if scheme == 's3':
        assert json.loads(objstore.read(url))['token'] == 'theirs'
    else:
        deletes = [params for method, _, args, params in calls
                   if method == 'DELETE' and any(workdir_lock.LOCK_NAME in str(a) for a in args)]
        assert deletes == [{'ifGenerationMatch': ours['generation']}], calls
    clear_fs_cache()


def test_release_falls_back_where_the_store_refuses_a_conditional_delete(objstore,
                                                                         monkeypatch):
    """An S3-compatible server that answers 501 to If-Match on DELETE: release checks the
    token, then deletes without the condition, so the lock does not outlive the command."""
    folder = objstore.new_bucket('s3') + '/run'
    monkeypatch.setattr(storage, '_FIRST_PAUSE_S', 0.01)
    monkeypatch.setenv('AWS_MAX_ATTEMPTS', '1')
    with FaultProxy(objstore.endpoints['s3'], 's3') as proxy, \
            routed('s3', proxy.url):
        lock = workdir_lock.BucketLock(folder, '--workdir').acquire()
        proxy.set(fail=501, count=1, match=lambda method, path: method == 'DELETE')
        lock.release()
        assert proxy.stats()['failed'] == 1
    assert workdir_lock.LOCK_NAME not in objstore.keys(folder)


# ---------------------------------------------------------------- a lost lease in training

SIZES = dict(steps_per_epoch=3, num_epochs=2, batch_size=8, image_size=32)


class _TakenOver(helpers.SyntheticIterator):
    def __next__(self):
        batch = super().__next__()
        if self.index - 1 == self.loader.at:
            storage.write_bytes(self.loader.url, _theirs())
            deadline = time.time() + 30
            while self.loader.until_noticed and not self.loader.lock.lost:
                assert time.time() < deadline, 'the renewal never noticed the takeover'
                time.sleep(0.02)
        return batch


class TakenOverLoader(helpers.SyntheticLoader):
    """Another command takes the work directory's lock over as batch `at` is drawn (this one
    stalled past its lease, as a suspended VM does); `until_noticed`: the draw then waits
    until this command's renewal has noticed."""

    def __init__(self, url, at, until_noticed, **kwargs):
        super().__init__(**kwargs)
        self.url, self.at, self.until_noticed, self.lock = url, at, until_noticed, None

    def iterator(self):
        return _TakenOver(self)


@pytest.mark.parametrize('noticed', ['by_the_renewal', 'at_the_epoch_end'])
def test_a_lost_lease_stops_training_with_nothing_more_written(noticed, objstore,
                                                               monkeypatch, caplog):
    """by_the_renewal: the renewal notices mid-epoch and asks the loop to stop, which would
    save a checkpoint as for SIGTERM; at_the_epoch_end: nobody noticed yet when the epoch ends
    and its checkpoint is due. Either way the run ends with one line, and the work directory
    holds nothing written after the takeover: no checkpoint, no metrics row, and the other
    command's lock."""
    from clusiam_jax.train.loop import train
    folder = objstore.new_bucket('s3') + '/run'
    url = f'{folder}/{workdir_lock.LOCK_NAME}'
    renewal = noticed == 'by_the_renewal'
    monkeypatch.setattr(workdir_lock.BucketLock, 'RENEW_S', 0.05 if renewal else 3600.0)
    loader = TakenOverLoader(url, at=0 if renewal else 1, until_noticed=renewal, **SIZES)
    interrupts.reset()
    try:
        with pytest.raises(ConfigError) as stopped:
            with workdir_lock.hold(folder, '--workdir', ['--workdir', folder]) as lock:
                loader.lock = lock
                train(helpers.tiny_config('clubyol', num_epochs=2), folder, loader,
                      helpers.mesh_of(1))
    finally:
        interrupts.reset()
    line = str(stopped.value)
    assert 'another command took over its lock' in line and '\n' not in line, line
    keys = objstore.keys(folder)
    assert not [k for k in keys if k.startswith('checkpoints/')], keys
    assert 'metrics.csv' not in keys and 'config.json' in keys, keys
    assert json.loads(objstore.read(url))['token'] == 'theirs'
    assert not [r for r in caplog.records if 'saved a checkpoint' in r.getMessage()]


# ---------------------------------------------------------------- a gs:// dataset's reads

@pytest.fixture
def gs_dataset(objstore, patches, monkeypatch):  # noqa: F811 (the fixture imported above)
    """(dataset URL in a fresh gs bucket, its local build's source): short pauses between
    storage's own retries, none between gcsfs's."""
    src, local = patches
    url, _ = _built_in_bucket(src, objstore.new_bucket('gs'), monkeypatch)
    monkeypatch.setattr(storage, '_FIRST_PAUSE_S', 0.01)
    monkeypatch.setattr(storage, '_ATTEMPTS', 2)
    _no_gcsfs_backoff(monkeypatch)
    return url, data.open_source(local)


def _unopened(source):
    """A copy of `source` as a grain worker gets it: its reader not opened yet."""
    return pickle.loads(pickle.dumps(source))


@contextlib.contextmanager
def _through(array_record_proxy, gcsfs_proxy):
    """array_record's reads through one proxy, ours (gcsfs, tfds's) through another (or the
    same one), for the duration."""
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv('CLOUD_STORAGE_EMULATOR_ENDPOINT', array_record_proxy.url)
        mp.setenv('STORAGE_EMULATOR_HOST', gcsfs_proxy.url)
        clear_fs_cache()
        yield
    finally:
        mp.undo()
        clear_fs_cache()


def test_access_lost_under_a_gs_dataset_ends_the_run(gs_dataset, objstore):
    """Every request refused (403: credentials revoked mid-run): array_record's read fails,
    and that is no damaged record to skip: one DataError, which ends the run."""
    url, reference = gs_dataset
    with FaultProxy(objstore.endpoints['gs'], 'gcs') as proxy, _through(proxy, proxy):
        source = sources.open_source(url)
        np.testing.assert_array_equal(source.load(0), reference.load(0))
        proxy.set(fail=403, count=None)
        with pytest.raises(DataError, match='cannot look up .*array_record.*access denied'
                           ) as failed:
            source.load(1)
        assert not isinstance(failed.value, (storage.Unreadable, image_io.BadImageError))
        # A worker's copy opens its reader now: the dataset's own files fail alike.
        with pytest.raises(DataError, match='access denied') as failed:
            _unopened(source).load(2)
        assert not isinstance(failed.value, (storage.Unreadable, image_io.BadImageError))


def test_an_outage_under_a_gs_dataset_ends_the_run_not_a_skip(gs_dataset, objstore,
                                                              tmp_path):
    """The bucket answers 503 to every request for the shard: array_record gives up on the
    record (after its own retries, 15 minutes; here a 403 to its reads stands in for that
    end, which comes at once), and our look at the shard meets the outage after our retries:
    the training loader ends with one DataError, skipping nothing, where it took the record
    for damaged, skipped it, and read other batches than an undisturbed run. (tfds's reads of
    the dataset's own files pass, so that the failure comes where array_record reads.)"""
    from clusiam_jax.data import augment, epoch_plan, pipeline, skips
    url, reference = gs_dataset
    shard = lambda method, path: '.array_record-' in path
    with FaultProxy(objstore.endpoints['gs'], 'gcs') as reads, \
            FaultProxy(objstore.endpoints['gs'], 'gcs') as ours, _through(reads, ours):
        source = sources.open_source(url)
        config = helpers.tiny_config(batch_size=4, num_epochs=3)
        plan = epoch_plan.EpochPlan(num_records=len(source), global_batch=4, process_index=0,
                                    process_count=1, num_epochs=3, seed=0)
        skip_list = str(tmp_path / skips.SKIPPED_FILES)
        loader = pipeline.TrainLoader(source, plan, augment.AugmentConfig.from_config(config),
                                      helpers.MEAN, helpers.STD, skip_list=skip_list)
        iterator = loader.iterator()
        next(iterator)   # its reader is open: what follows fails where array_record reads
        reads.set(fail=403, count=None, match=shard)
        ours.set(fail=503, count=None, match=shard)
        with pytest.raises(DataError, match='cannot look up .*array_record.*503') as failed:
            for _ in range(plan.steps_per_epoch * 3 - 1):
                next(iterator)
        assert not isinstance(failed.value, storage.Unreadable)
        assert reads.stats()['failed'] >= 1 and ours.stats()['failed'] >= 2  # our retries
        if hasattr(iterator, 'close'):
            iterator.close()
    assert not os.path.exists(skip_list) or not open(skip_list).read().strip()


def test_a_gs_read_failure_that_has_passed_is_read_again(gs_dataset, objstore):
    """array_record's read fails once (its reader then stays failed for good), the bucket
    answers again: the record is read through a new reader, the same bytes as the local
    build, not skipped as damaged; the records after it too."""
    url, reference = gs_dataset
    with FaultProxy(objstore.endpoints['gs'], 'gcs') as proxy, _through(proxy, proxy):
        source = sources.open_source(url)
        np.testing.assert_array_equal(source.load(0), reference.load(0))
        proxy.reset_stats()
        proxy.set(fail=403, count=1, match=lambda method, path: '.array_record-' in path)
        for i in range(1, len(reference)):
            np.testing.assert_array_equal(source.load(i), reference.load(i))
        assert proxy.stats()['failed'] == 1


def test_a_damaged_record_of_a_gs_dataset_is_still_skipped(gs_dataset, objstore, tmp_path):
    """Bytes of one record's chunk changed in the bucket (the store answers normally): that
    record is a damaged file as before (BadImageError: skipped and listed); which records
    are damaged is what array_record itself finds in a local copy of the same bytes."""
    from array_record.python import array_record_module
    url, reference = gs_dataset
    shard = storage.join(url, [n for n in storage.listdir(url) if '.array_record-' in n][0])
    raw = bytearray(objstore.read(shard))
    raw[2000] ^= 0x5A   # inside a record's chunk (the shard is padded to 128 KiB)
    objstore.fs('gs').pipe_file(shard, bytes(raw))
    copy = str(tmp_path / 'damaged.array_record')
    with open(copy, 'wb') as f:
        f.write(bytes(raw))
    reader, damaged = array_record_module.ArrayRecordReader(copy), set()
    for i in range(reader.num_records()):
        try:
            reader.read([i])
        except RuntimeError:
            damaged.add(i)
    reader.close()
    assert damaged and len(damaged) < len(reference)
    source = sources.open_source(url)
    for i in range(len(reference)):
        if i in damaged:
            with pytest.raises(image_io.BadImageError, match=f'record {i}'):
                source.load(i)
        else:
            np.testing.assert_array_equal(source.load(i), reference.load(i))


# ---------------------------------------------------------------- object versions

def test_gs_versions_are_generations_alike_from_a_lookup_and_a_listing(objstore):
    """gs://: (size, generation) from a lookup and from a listing alike; the same bytes
    written again are another generation (GCS's ETag changes then too; fake-gcs-server's
    is the bytes' MD5 and does not)."""
    bucket = objstore.new_bucket('gs')
    fs = objstore.fs('gs')
    fs.pipe_file(f'{bucket}/d/a.bin', b'12345')
    fs.pipe_file(f'{bucket}/d/sub/b.bin', b'xy')
    first = storage.version(f'{bucket}/d/a.bin')
    assert first == (5, str(fs.info(f'{bucket}/d/a.bin')['generation']))
    assert storage.versions(f'{bucket}/d') == {'a.bin': first,
                                                'sub/b.bin': storage.version(
                                                    f'{bucket}/d/sub/b.bin')}
    assert storage.versions(f'{bucket}/d', recursive=False) == {'a.bin': first}
    fs.pipe_file(f'{bucket}/d/a.bin', b'12345')
    assert storage.version(f'{bucket}/d/a.bin')[1] != first[1]
    s3 = objstore.new_bucket('s3')
    objstore.fs('s3').pipe_file(f'{s3}/a.bin', b'12345')
    assert storage.version(f'{s3}/a.bin') == (
        5, objstore.fs('s3').info(f'{s3}/a.bin')['ETag'].strip('"'))


def test_a_metadata_update_keeps_a_gs_objects_version(objstore, monkeypatch):
    """On GCS a metadata-only update (labels, content type) gives an object a new ETag but
    keeps its generation; a tile index or staged copy keyed on the version must not go
    stale then. fake-gcs-server keeps both, so the update's new ETag is put into gcsfs's
    answers here, as GCS would give it."""
    import gcsfs
    bucket = objstore.new_bucket('gs')
    url = f'{bucket}/slides/a.svs'
    objstore.fs('gs').pipe_file(url, b'slide bytes')
    before = storage.version(url), storage.versions(f'{bucket}/slides')
    real_info, real_ls = gcsfs.GCSFileSystem._info, gcsfs.GCSFileSystem._ls

    def updated(entry):
        return dict(entry, etag='CKiH4uLj+vcCEAI=') if isinstance(entry, dict) else entry

    async def info(self, path, **kwargs):
        return updated(await real_info(self, path, **kwargs))

    async def ls(self, path, detail=True, **kwargs):
        out = await real_ls(self, path, detail=detail, **kwargs)
        return [updated(e) for e in out] if detail else out
    monkeypatch.setattr(gcsfs.GCSFileSystem, '_info', info)
    monkeypatch.setattr(gcsfs.GCSFileSystem, '_ls', ls)
    clear_fs_cache()
    assert (storage.version(url), storage.versions(f'{bucket}/slides')) == before
    monkeypatch.undo()
    clear_fs_cache()
