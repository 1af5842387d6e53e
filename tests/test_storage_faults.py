"""Faults injected between the product and the loopback object stores (bench/objstore_proxy's
FaultProxy; tests/objstore.py): a 503 burst, a dropped connection and a slow answer are
retried or waited out with the same bytes; an object deleted mid-run is skipped and listed;
a missing bucket, bad credentials and a read-only work directory end a command in one
`error:` line (exit status 2) with nothing written.

The bursts outlast the client's own retries (botocore's are turned off with AWS_MAX_ATTEMPTS,
gcsfs's waits skipped; tests/test_objstore_servers.py says what each client does alone), so
what recovers is storage._retried, and its telemetry counts it."""
import csv
import io
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from bench.objstore_proxy import FaultProxy
from clusiam_jax import storage, storage_errors
from clusiam_jax.data import augment, epoch_plan, pipeline, skips
from clusiam_jax.data.records import PatchSource
from clusiam_jax.errors import DataError
from tests import helpers, test_storage_slides
from tests.objstore import env_for, routed

DATA = os.urandom(300_000)  # more than one read chunk: a drop lands mid-body


def _flavor(scheme):
    return 'gcs' if scheme == 'gs' else 's3'


def _no_gcsfs_backoff(monkeypatch):
    """gcsfs sleeps 1, 2, 4, 8, 16 s between its 6 tries: skipped here."""
    import gcsfs.retry

    async def no_sleep(_):
        return None
    monkeypatch.setattr(gcsfs.retry, 'asyncio', types.SimpleNamespace(sleep=no_sleep))


# The attempts each client makes alone before storage._retried sees the error.
_CLIENT_TRIES = {'s3': 1, 'gs': 6}         # 503: botocore (AWS_MAX_ATTEMPTS=1), gcsfs
_CLIENT_DROP_TRIES = {'s3': 5, 'gs': 6}    # a cut body: s3fs's own loop, gcsfs


@pytest.fixture
def proxied(bucket, objstore, monkeypatch):
    """(bucket holding x.bin, a FaultProxy in front of its server): this process's storage
    calls go through the proxy, with short pauses between storage's own retries."""
    scheme = bucket[:2]
    objstore.fs(scheme).pipe_file(f'{bucket}/x.bin', DATA)
    monkeypatch.setattr(storage, '_FIRST_PAUSE_S', 0.01)
    monkeypatch.setenv('AWS_MAX_ATTEMPTS', '1')
    if scheme == 'gs':
        _no_gcsfs_backoff(monkeypatch)
    with FaultProxy(objstore.endpoints[scheme], _flavor(scheme)) as proxy, \
            routed(scheme, proxy.url):
        storage.read_bytes(f'{bucket}/x.bin')  # the client's set-up: not under test
        storage.telemetry.take()
        proxy.reset_stats()
        yield bucket, proxy
    storage.telemetry.take()  # what a failing test left: not the next test's


def test_a_503_burst_longer_than_the_clients_retries_is_retried_with_the_same_bytes(proxied):
    bucket, proxy = proxied
    scheme = bucket[:2]
    proxy.set(fail=503, count=_CLIENT_TRIES[scheme] + 1)
    assert storage.read_bytes(f'{bucket}/x.bin') == DATA
    proxy.set(fail=503, count=2 * _CLIENT_TRIES[scheme] + 1)  # two ranges: two requests
    assert storage.read_ranges(f'{bucket}/x.bin', [(5, 1000), (299_000, 300_000)]) == [
        DATA[5:1000], DATA[299_000:]]
    counts = storage.telemetry.take()
    # s3fs's read_bytes asks HEAD then GET: each 503 it meets costs one retry of ours.
    assert counts['retries'] >= 2 and counts['errors'] == 0, proxy.log
    assert counts['requests'] == 3 and counts['bytes'] == len(DATA) + 995 + 1000
    assert proxy.stats()['failed'] == 3 * _CLIENT_TRIES[scheme] + 2


def test_a_dropped_connection_mid_read_is_retried(proxied):
    bucket, proxy = proxied
    scheme = bucket[:2]
    proxy.set(drop=50_000, count=_CLIENT_DROP_TRIES[scheme] + 1)
    assert storage.read_ranges(f'{bucket}/x.bin', [(0, 200_000)]) == [DATA[:200_000]]
    assert proxy.stats()['dropped'] == _CLIENT_DROP_TRIES[scheme] + 1
    assert storage.telemetry.take()['retries'] == 1


def test_a_503_burst_during_a_write_is_retried_and_the_object_is_whole(proxied, objstore):
    bucket, proxy = proxied
    proxy.set(fail=503, count=_CLIENT_TRIES[bucket[:2]] + 1,
              match=lambda method, path: method in ('PUT', 'POST'))
    storage.write_bytes(f'{bucket}/y.bin', DATA)
    assert objstore.read(f'{bucket}/y.bin') == DATA
    assert storage.telemetry.take()['retries'] >= 1
    assert proxy.stats()['failed'] == _CLIENT_TRIES[bucket[:2]] + 1


def test_a_slow_answer_is_waited_for_and_timed(proxied):
    bucket, proxy = proxied
    proxy.set(delay=0.3)
    assert storage.read_ranges(f'{bucket}/x.bin', [(7, 70)]) == [DATA[7:70]]
    counts = storage.telemetry.take()
    assert counts['retries'] == 0 and counts['latency_mean_ms'] >= 300


def test_a_503_without_end_is_one_error_that_ends_the_run_not_a_skip(proxied, monkeypatch):
    """An outage is no damaged file: skipped, the run would read other batches than an
    undisturbed one; a plain DataError ends it (it then resumes exactly)."""
    bucket, proxy = proxied
    monkeypatch.setattr(storage, '_ATTEMPTS', 2)
    proxy.set(fail=503, count=None)
    with pytest.raises(DataError, match='cannot read .*x.bin') as failed:
        storage.read_bytes(f'{bucket}/x.bin')
    assert not isinstance(failed.value, storage.Unreadable)
    counts = storage.telemetry.take()
    assert counts['retries'] == 1 and counts['errors'] == 1


def test_a_lost_connection_is_one_error_that_ends_the_run_not_a_skip(monkeypatch):
    monkeypatch.setattr(storage, '_FIRST_PAUSE_S', 0.0)

    def refused():
        raise ConnectionRefusedError(111, 'Connection refused')
    with pytest.raises(DataError, match='cannot read s3://b/x.svs') as failed:
        storage._retried('read', 's3://b/x.svs', refused)
    assert not isinstance(failed.value, storage.Unreadable)
    storage.telemetry.take()


def test_a_programming_error_passes_through_and_client_errors_become_one_line():
    import gcsfs.retry

    def bug():
        raise TypeError('unsupported operand')
    with pytest.raises(TypeError, match='unsupported operand'):
        storage._retried('read', 'gs://b/x.bin', bug)

    def refused():   # gcsfs's own type, no OSError
        raise gcsfs.retry.HttpError({'code': 400, 'message': 'Bad Request'})
    with pytest.raises(DataError, match='cannot read gs://b/x.bin: Bad Request') as failed:
        storage._retried('read', 'gs://b/x.bin', refused)
    assert not isinstance(failed.value, storage.Unreadable)
    storage.telemetry.take()


def test_lookups_see_what_another_process_wrote_after_a_listing(bucket, objstore):
    """isfile/exists/isdir/version answer from the store, not from a listing made before
    another process (here another client) wrote."""
    folder = f'{bucket}/run'
    storage.write_bytes(f'{folder}/a.csv', b'1')
    assert storage.listdir(folder) == ['a.csv'] and storage.find_files(folder) == ['a.csv']
    assert not storage.isfile(f'{folder}/b.csv') and not storage.isdir(f'{folder}/sub')
    other = objstore.fs(bucket[:2])
    other.pipe_file(f'{folder}/b.csv', b'2')
    other.pipe_file(f'{folder}/a.csv', b'3333')
    other.pipe_file(f'{folder}/sub/c.csv', b'4')
    assert storage.isfile(f'{folder}/b.csv') and storage.exists(f'{folder}/b.csv')
    assert storage.isdir(f'{folder}/sub')
    assert storage.version(f'{folder}/a.csv')[0] == 4
    other.rm(f'{folder}/b.csv')
    assert not storage.exists(f'{folder}/b.csv')


def test_resolve_keeps_a_relative_path_in_its_bucket():
    assert storage.resolve('gs://b/dir', 'x.svs') == 'gs://b/dir/x.svs'
    assert storage.resolve('gs://b/dir', '../x.svs') == 'gs://b/x.svs'
    assert storage.resolve('gs://b/dir', 's3://o/x.svs') == 's3://o/x.svs'
    with pytest.raises(DataError, match='/data/x.svs is a local path'):
        storage.resolve('gs://b/dir', '/data/x.svs')
    for climbing in ('../../other/x.svs', 'a/../../../other/x.svs'):
        with pytest.raises(DataError, match='climbs above the bucket gs://b'):
            storage.resolve('gs://b/dir', climbing)


def test_a_slide_list_in_a_bucket_names_the_row_of_a_path_out_of_it(bucket):
    from clusiam_jax import fileio
    url = f'{bucket}/lists/slides.csv'
    storage.write_bytes(url, b'path\nx.svs\n/data/y.svs\n')
    with pytest.raises(DataError, match=r'slides\.csv:3: /data/y\.svs is a local path'):
        fileio.read_path_csv(url, 'slide list', 'path')


def test_telemetry_keeps_no_list_of_latencies():
    """A process that never takes its counters (export, tiling) must not grow."""
    import tracemalloc
    counts = storage.Telemetry()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(20_000):
        counts.add(1, 10, 0.01)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 20_000, grown
    counts.add(1, 10, 1.0)
    taken = counts.take()
    assert taken['requests'] == 20_001 and taken['bytes'] == 200_010
    assert 10.0 <= taken['latency_p99_ms'] <= 10.0 * 1.19
    assert abs(taken['latency_mean_ms'] - 1e3 * (200 + 1.0) / 20_001) < 1e-3


def test_a_missing_object_and_bad_credentials_are_not_retried(proxied):
    bucket, proxy = proxied
    with pytest.raises(storage.Unreadable, match='no such object'):
        storage.read_bytes(f'{bucket}/gone.bin')
    assert storage.telemetry.take()['retries'] == 0
    assert sum('gone.bin' in path for _, path, _ in proxy.log) == 1, proxy.log
    proxy.set(fail=403, count=None)
    with pytest.raises(DataError, match='access denied') as refused:
        storage.read_ranges(f'{bucket}/x.bin', [(0, 10)])
    assert not isinstance(refused.value, storage.Unreadable)  # ends a run, never skipped
    assert [status for _, _, status in proxy.log][-1:] == [403]
    assert storage.telemetry.take()['retries'] == 0


def test_transient_is_told_by_type_and_status_not_by_text():
    import aiohttp
    import gcsfs.retry
    assert storage_errors.transient(gcsfs.retry.HttpError({'code': 503, 'message': 'x'}))
    assert storage_errors.transient(aiohttp.ClientPayloadError('cut'))
    assert storage_errors.transient(aiohttp.ServerDisconnectedError())
    assert storage_errors.transient(OSError(16, 'Service Unavailable'))  # s3fs's EBUSY
    assert storage_errors.transient(TimeoutError())
    assert not storage_errors.transient(gcsfs.retry.HttpError({'code': 400, 'message': '503'}))
    assert not storage_errors.transient(OSError('Forbidden: b/slide_503.svs'))
    assert not storage_errors.transient(FileNotFoundError('b/500_1000.png'))
    assert not storage_errors.transient(ValueError('Timeout 503 Connection'))


# ---------------------------------------------------------------- the training pipeline

class BucketPatches(PatchSource):
    """PNG patches that are objects in a bucket, each read whole through storage (the
    pipeline's view of any bucket source: reads counted, a missing object Unreadable)."""

    def __init__(self, urls):
        self.urls = list(urls)
        self.slide_ids = np.array([''])
        self.slide_index = np.zeros(len(self.urls), np.int32)

    def path(self, index):
        return self.urls[index]

    def load(self, index):
        from clusiam_jax.data import image_io
        return image_io.decode_rgb(storage.read_bytes(self.urls[index]))


def _png(i):
    img = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(img).save(out, format='PNG')
    return out.getvalue()


def test_an_object_deleted_between_epochs_is_skipped_listed_and_training_goes_on(
        objstore, tmp_path, caplog):
    """Two epochs of a bucket patch folder; one patch object is deleted once the first
    epoch's reads are done: the second epoch substitutes it (seeded), lists it in
    skipped_files.txt, and the batches carry each element's bucket reads."""
    bucket = objstore.new_bucket('s3')
    fs = objstore.fs('s3')
    storage.telemetry.take()  # this process's reads so far: not the pipeline's
    urls = [f'{bucket}/patches/p{i:02d}.png' for i in range(8)]
    for i, url in enumerate(urls):
        fs.pipe_file(url, _png(i))
    config = helpers.tiny_config(batch_size=4, num_epochs=2)
    plan = epoch_plan.EpochPlan(num_records=8, global_batch=4, process_index=0, process_count=1,
                                num_epochs=2, seed=0)
    skip_list = str(tmp_path / skips.SKIPPED_FILES)
    loader = pipeline.TrainLoader(BucketPatches(urls), plan,
                                  augment.AugmentConfig.from_config(config), helpers.MEAN,
                                  helpers.STD, skip_list=skip_list, count_io=True)
    iterator = loader.iterator()
    first = [next(iterator) for _ in range(2)]
    assert all(set(b) == {'view1', 'view2'} for b in first)  # the counters were taken off
    counts = storage.Telemetry.summary(iterator.take_input_counts())
    assert counts['requests'] == 8 and counts['errors'] == 0
    assert counts['bytes'] == sum(len(_png(i)) for i in range(8))
    fs.rm(urls[3])
    second = [next(iterator) for _ in range(2)]
    iterator.close()
    assert all(b['view1'].shape == (4, 32, 32, 3) for b in second)
    with open(skip_list) as f:
        assert f.read().splitlines() == [urls[3]]
    counts = storage.Telemetry.summary(iterator.take_input_counts())
    assert counts['errors'] == 1 and counts['requests'] == 8  # 7 found + 1 substitute
    assert storage.telemetry.take()['requests'] == 0  # nothing left uncounted here


def _cli(args, env, tmp_path):
    return subprocess.run(
        [sys.executable, 'launch.py', '--config', 'configs/demo.py',
         '--config.model.backbone=resnet_tiny', '--config.data.image_size=32',
         '--config.export.after_training=False', '--config.train.num_epochs=1', *args],
        cwd=helpers.REPO, env=helpers.subprocess_env(**env), capture_output=True, text=True,
        timeout=300)


def _one_error(done):
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count('error:') == 1, done.stderr[-3000:]
    assert 'Traceback' not in done.stderr and 'compiling' not in done.stderr
    return done.stderr.split('error:', 1)[1]


@pytest.mark.parametrize('scheme', ['s3', 'gs'])
def test_data_path_in_a_missing_bucket_is_one_error_line(scheme, objstore, tmp_path):
    if scheme not in objstore.endpoints:
        pytest.skip(f'no {scheme}:// test server on this platform')
    missing = f'{scheme}://no-such-bucket-{os.getpid()}/tiles'
    done = _cli([f'--workdir={tmp_path / "run"}', f'--config.data.path={missing}'], {}, tmp_path)
    assert missing in _one_error(done)


@pytest.mark.parametrize('in_bucket', ['workdir', 'data.path'])
def test_bad_credentials_are_one_error_line(in_bucket, bucket, objstore, tmp_path, demo_tiles):
    """Every request answered 403, as a store answers a wrong key: the run stops before
    training with one line (not 'does not exist'), and nothing reaches the bucket."""
    scheme = bucket[:2]
    args = ([f'--workdir={bucket}/run', f'--config.data.path={demo_tiles}']
            if in_bucket == 'workdir' else
            [f'--workdir={tmp_path / "run"}', f'--config.data.path={bucket}/tiles'])
    with FaultProxy(objstore.endpoints[scheme], _flavor(scheme)) as proxy:
        proxy.set(fail=403, count=None)
        line = _one_error(_cli(args, env_for(scheme, proxy.url), tmp_path))
        assert proxy.stats()['forwarded'] == 0
    assert 'access denied' in line and bucket in line, line
    assert objstore.keys(bucket) == []


def test_a_read_only_work_directory_bucket_is_one_error_line_and_nothing_written(
        bucket, objstore, tmp_path, demo_tiles):
    """Reads pass, every write (PUT, POST) is refused: one line before training starts,
    and the bucket holds nothing of the run, not even part of an object."""
    scheme = bucket[:2]
    objstore.fs(scheme).pipe_file(f'{bucket}/keep.txt', b'already there')
    with FaultProxy(objstore.endpoints[scheme], _flavor(scheme)) as proxy:
        proxy.set(fail=403, count=None, match=lambda method, path: method in ('PUT', 'POST'))
        done = _cli([f'--workdir={bucket}/run', f'--config.data.path={demo_tiles}'],
                    env_for(scheme, proxy.url), tmp_path)
        line = _one_error(done)
        assert proxy.stats()['failed'] >= 1
    assert 'access denied' in line and f'{bucket}/run' in line, line
    assert objstore.objects(bucket) == {'keep.txt': b'already there'}


def test_metrics_csv_has_input_columns_only_for_a_run_reading_a_bucket(tmp_path):
    """metrics.csv gains the input_ columns only when the source reads a bucket."""
    from clusiam_jax.train.metrics import CSV_FIELDS, INPUT_FIELDS, MetricWriter
    local = MetricWriter(str(tmp_path / 'local'), enabled=True)
    os.makedirs(tmp_path / 'local', exist_ok=True)
    local.epoch_row({'epoch': 1, 'step': 2})
    local.close()
    with open(tmp_path / 'local' / 'metrics.csv') as f:
        assert tuple(next(csv.reader(f))) == CSV_FIELDS
    remote = MetricWriter(str(tmp_path / 'remote'), enabled=True)
    os.makedirs(tmp_path / 'remote', exist_ok=True)
    remote.epoch_row({'epoch': 1, 'step': 2, 'input_requests': 8, 'input_bytes': 100})
    remote.close()
    with open(tmp_path / 'remote' / 'metrics.csv') as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_FIELDS + INPUT_FIELDS and rows[0]['input_requests'] == '8'


@pytest.fixture(scope='module')
def slide_folder(tmp_path_factory):
    """test_storage_slides' four small pyramids."""
    return test_storage_slides.slide_folder.__wrapped__(tmp_path_factory)


def test_training_from_a_bucket_reports_its_reads_and_local_training_does_not(
        slide_folder, objstore, tmp_path, monkeypatch, caplog):
    """Slides in an s3 bucket (gs reads through the same storage calls), read by one grain
    worker process: the reads reach the main process with the batches, per log window in
    TensorBoard (input/...) and per epoch in metrics.csv and the log; the same run from
    local disk has metrics.csv's usual columns."""
    import logging

    from clusiam_jax.train.loop import train
    from clusiam_jax.train.metrics import CSV_FIELDS, INPUT_FIELDS
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    out, local = test_storage_slides.tiled.__wrapped__(slide_folder, objstore.new_bucket('s3'))
    rows = {}
    for where, path, slide_dir, workers in (('bucket', out, '', 1), ('disk', out, local, 0)):
        config = helpers.tiny_config(batch_size=8, num_epochs=1)
        config.data.path, config.data.slide_dir = path, slide_dir
        config.data.num_workers = workers
        config.data.mean, config.data.std = helpers.MEAN, helpers.STD
        workdir = str(tmp_path / where)
        with caplog.at_level(logging.INFO, logger='clusiam_jax'):
            train(config, workdir, mesh=helpers.mesh_of(1))
        with open(os.path.join(workdir, 'metrics.csv')) as f:
            rows[where] = list(csv.DictReader(f))
        tb = os.path.join(workdir, 'tb')
        events = b''.join(open(os.path.join(tb, n), 'rb').read() for n in os.listdir(tb))
        assert (b'input/requests' in events) == (where == 'bucket')
    assert tuple(rows['disk'][0]) == CSV_FIELDS
    row = rows['bucket'][0]
    assert tuple(row) == CSV_FIELDS + INPUT_FIELDS, row
    assert int(row['input_requests']) > 0 and int(row['input_bytes']) > 0, row
    # One failed read: slide d's tile index, removed by the fixture (a 404, then staged whole).
    assert int(row['input_read_errors']) == 1 and int(row['input_slides_opened']) >= 4, row
    assert 0 <= float(row['input_cache_hit_rate']) <= 1, row  # b and d are staged whole
    assert float(row['input_read_ms_p99']) >= float(row['input_read_ms_mean']) > 0, row
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('epoch 1/1')]
    assert len(lines) == 2 and '; input: ' in lines[0] and 'input' not in lines[1], lines
