"""The loopback object stores and the fault proxy behave as the storage tests rely on:
s3fs and gcsfs write, read, range-read and list on moto and fake-gcs-server through the
environment alone (also in a child process), and tensorstore (orbax's arrays) and array_record
through their own variables; the proxy adds its delay once per request, and
its 503 bursts, dropped connections and 403s reach the client as each library handles them.

What the clients retry by default (measured here, pinned versions):
- s3: botocore's 'legacy' mode makes 5 attempts in all for a 5xx, rand()*2**n s apart, then
  s3fs raises OSError (errno EBUSY for ServiceUnavailable). A response cut short is not
  botocore's (the body is read after it returns): s3fs makes 5 attempts, 0.1*1.7**n s apart,
  then raises aiohttp's ClientPayloadError. A 403 is not retried (PermissionError).
- gs: gcsfs makes 6 attempts for 5xx, 408, 429 and cut responses, rand()+2**n s apart (1, 2,
  4, 8, 16 s: a dead object costs over 31 s), then raises gcsfs.retry.HttpError (not an
  OSError) or the aiohttp error. A 403 is not retried (OSError 'Forbidden').
"""
import os
import subprocess
import sys
import time
import types

import aiohttp
import fsspec
import pytest

from bench.objstore_proxy import FaultProxy, control, spawn
from tests.helpers import subprocess_env
from tests.objstore import routed

DATA = os.urandom(300_000)  # larger than one read chunk, so a drop can land mid-body


def _flavor(scheme):
    return 'gcs' if scheme == 'gs' else 's3'


def test_write_read_range_list_match_local_disk(bucket, objstore, tmp_path):
    fs, root = fsspec.core.url_to_fs(bucket)  # from the environment, as the product does
    local = tmp_path / 'run'
    files = {'a.bin': DATA, 'sub/b.txt': b'hello\n', 'sub/deep/c.json': b'{}'}
    for key, data in files.items():
        fs.pipe_file(f'{root}/run/{key}', data)
        (local / key).parent.mkdir(parents=True, exist_ok=True)
        (local / key).write_bytes(data)

    assert objstore.objects(f'{bucket}/run') == files
    fs.invalidate_cache()
    listed = sorted(p.split('/run/', 1)[1] for p in fs.find(f'{root}/run'))
    assert listed == sorted(str(p.relative_to(local)) for p in local.rglob('*') if p.is_file())
    assert fs.cat_file(f'{root}/run/a.bin') == (local / 'a.bin').read_bytes()
    with open(local / 'a.bin', 'rb') as f:
        f.seek(1234)
        expected = f.read(5000)
    assert fs.cat_file(f'{root}/run/a.bin', start=1234, end=6234) == expected
    assert fs.cat_ranges([f'{root}/run/a.bin'] * 2, [0, 299_990], [10, 300_000]) == [
        DATA[:10], DATA[-10:]]
    assert fs.size(f'{root}/run/a.bin') == len(DATA)
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f'{root}/run/missing')


def test_a_child_process_reaches_the_servers_through_the_environment(bucket, objstore):
    objstore.fs(bucket[:2]).pipe_file(f'{bucket}/x', b'from the parent')
    code = ('import sys, fsspec; fs, p = fsspec.core.url_to_fs(sys.argv[1]); '
            'fs.pipe_file(p + "/y", fs.cat_file(p + "/x") + b" and back")')
    done = subprocess.run([sys.executable, '-c', code, bucket], env=subprocess_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert objstore.read(f'{bucket}/y') == b'from the parent and back'


def test_tensorstore_gcs_kvstore_reaches_fake_gcs(objstore):
    """orbax writes array data through tensorstore's own gcs driver, which reads
    TENSORSTORE_GCS_HTTP_URL, not STORAGE_EMULATOR_HOST."""
    ts = pytest.importorskip('tensorstore')
    bucket = objstore.new_bucket('gs')
    store = ts.KvStore.open({'driver': 'gcs', 'bucket': bucket[5:], 'path': 'k/'}).result()
    store.write('v', b'tensorstore bytes').result()
    assert objstore.read(f'{bucket}/k/v') == b'tensorstore bytes'
    assert store.read('v').result().value == b'tensorstore bytes'


def test_array_record_reads_a_shard_from_fake_gcs(objstore, tmp_path):
    """array_record reads gs:// itself (google-cloud-cpp), pointed at the emulator by
    CLOUD_STORAGE_EMULATOR_ENDPOINT; without it the reader waits minutes for real GCS, so
    the read runs in a child process under a timeout."""
    pytest.importorskip('array_record')
    from array_record.python.array_record_module import ArrayRecordWriter
    bucket = objstore.new_bucket('gs')
    records = [os.urandom(100 + i) for i in range(50)]
    writer = ArrayRecordWriter(str(tmp_path / 'shard.ar'), 'group_size:1')
    for record in records:
        writer.write(record)
    writer.close()
    objstore.fs('gs').put_file(str(tmp_path / 'shard.ar'), f'{bucket}/ds/shard.ar')
    code = ('import sys; from array_record.python.array_record_module import '
            'ArrayRecordReader as R; r = R(sys.argv[1], "readahead_buffer_size:0"); '
            'assert r.ok(); sys.stdout.buffer.write(b"".join(r.read([0, 7, 49])))')
    done = subprocess.run([sys.executable, '-c', code, f'{bucket}/ds/shard.ar'],
                          env=subprocess_env(), capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == records[0] + records[7] + records[49]


@pytest.fixture(scope='module')
def proxies(objstore):
    """One FaultProxy per server for this module, each with an fsspec file system through
    it (a new s3fs client costs about 1 s to set up, so they are shared)."""
    made = {}

    def get(scheme):
        if scheme not in made:
            proxy = FaultProxy(objstore.endpoints[scheme], _flavor(scheme)).start()
            made[scheme] = proxy, objstore.fs(scheme, proxy.url)
        return made[scheme]
    yield get
    for proxy, _ in made.values():
        proxy.stop()


@pytest.fixture
def proxied(bucket, objstore, proxies):
    """(bucket holding x.bin, the FaultProxy in front of its server without faults and
    with zeroed counters, an fsspec file system through it)."""
    proxy, fs = proxies(bucket[:2])
    objstore.fs(bucket[:2]).pipe_file(f'{bucket}/x.bin', DATA)
    proxy.clear()
    fs.cat_file(f'{bucket}/x.bin', start=0, end=1)  # the client's set-up is not timed
    proxy.reset_stats()
    yield bucket, proxy, fs
    proxy.clear()


def test_proxy_delays_once_per_request(proxied):
    bucket, proxy, fs = proxied
    proxy.set(delay=0.25)
    start = time.perf_counter()
    assert fs.cat_file(f'{bucket}/x.bin', start=100, end=200) == DATA[100:200]
    elapsed = time.perf_counter() - start
    # s3fs and gcsfs send a ranged read as one request, in one or two writes.
    assert proxy.stats()['requests'] == 1 and 0.25 <= elapsed < 0.45, (elapsed, proxy.log)
    start = time.perf_counter()
    fs.pipe_file(f'{bucket}/up.bin', DATA * 10)  # a 3 MB body, sent in many chunks
    elapsed = time.perf_counter() - start
    assert proxy.stats()['requests'] == 2 and 0.25 <= elapsed < 0.7, (elapsed, proxy.log)
    assert proxy.stats()['delayed_s'] == pytest.approx(0.5)


def test_routed_sends_the_environment_clients_through_the_proxy(proxied):
    bucket, proxy, _ = proxied
    with routed(bucket[:2], proxy.url):
        assert fsspec.core.url_to_fs(bucket)[0].cat_file(f'{bucket}/x.bin') == DATA
    assert proxy.stats()['forwarded'] >= 1
    before = proxy.stats()['requests']
    fsspec.core.url_to_fs(bucket)[0].cat_file(f'{bucket}/x.bin')
    assert proxy.stats()['requests'] == before  # back to the server directly


def test_503_burst_is_retried_by_the_client(proxied):
    bucket, proxy, fs = proxied
    burst = 2 if bucket.startswith('s3') else 1  # gcsfs waits 1-2 s, then 2-3 s, per retry
    proxy.set(fail=503, count=burst)
    assert fs.cat_file(f'{bucket}/x.bin', start=10, end=250_000) == DATA[10:250_000]
    assert [status for _, _, status in proxy.log] == [503] * burst + [206]


def test_503_without_end_is_an_error(proxied, objstore, monkeypatch):
    bucket, proxy, _ = proxied
    proxy.set(fail=503, count=None)
    if bucket.startswith('s3'):
        fs = fsspec.filesystem('s3', key='testing', secret='testing',
                               client_kwargs={'endpoint_url': proxy.url},
                               config_kwargs={'retries': {'total_max_attempts': 1}})
        attempts, error = 1, OSError  # errno EBUSY, from code ServiceUnavailable
    else:
        import gcsfs.retry
        fs = objstore.fs('gs', proxy.url)
        _no_backoff(monkeypatch)
        attempts, error = 6, gcsfs.retry.HttpError  # not an OSError
    with pytest.raises(error, match='Service Unavailable'):
        fs.cat_file(f'{bucket}/x.bin')
    assert [status for _, _, status in proxy.log] == [503] * attempts


def test_dropped_connection_is_retried_once_and_an_error_when_it_persists(
        proxied, monkeypatch):
    bucket, proxy, fs = proxied
    proxy.set(drop=1000, count=1)
    assert fs.cat_file(f'{bucket}/x.bin', start=0, end=200_000) == DATA[:200_000]
    assert [status for _, _, status in proxy.log] == ['dropped', 206]
    proxy.reset_stats()
    proxy.set(drop=1000, count=None)
    if bucket.startswith('gs'):
        _no_backoff(monkeypatch)
    with pytest.raises(aiohttp.ClientPayloadError):  # from both; not an OSError
        fs.cat_file(f'{bucket}/x.bin', start=0, end=200_000)
    assert proxy.stats()['dropped'] == (5 if bucket.startswith('s3') else 6)


def test_403_is_an_error_without_retries(proxied):
    bucket, proxy, fs = proxied
    proxy.set(fail=403, count=None)
    expected = PermissionError if bucket.startswith('s3') else OSError
    with pytest.raises(expected, match='Forbidden'):
        fs.cat_file(f'{bucket}/x.bin')
    with pytest.raises(expected, match='Forbidden'):
        fs.pipe_file(f'{bucket}/new.bin', b'never written')
    assert [status for _, _, status in proxy.log] == [403, 403]
    proxy.clear()
    assert not fs.exists(f'{bucket}/new.bin')


def test_proxy_in_its_own_process_is_controlled_over_http(objstore):
    bucket = objstore.urls['s3']
    objstore.fs('s3').pipe_file(f'{bucket}/p.bin', b'x' * 1000)
    with spawn(objstore.endpoints['s3'], 's3', delay=0.1) as url:
        fs = objstore.fs('s3', url)
        assert fs.cat_file(f'{bucket}/p.bin', start=0, end=10) == b'x' * 10
        stats = control(url)
        assert stats['requests'] == 1 and stats['bytes_out'] == 10 and stats['cpu_s'] > 0
        assert stats['delayed_s'] == pytest.approx(0.1)
        control(url, 'set', fail=503, count=1)
        control(url, 'reset')
        assert fs.cat_file(f'{bucket}/p.bin', start=0, end=10) == b'x' * 10
        assert control(url)['failed'] == 1 and control(url)['forwarded'] == 1


def _no_backoff(monkeypatch):
    """gcsfs sleeps 1, 2, 4, 8 and 16 s between its 6 tries: skip the waits here."""
    import gcsfs.retry

    async def no_sleep(_):
        return None
    monkeypatch.setattr(gcsfs.retry, 'asyncio', types.SimpleNamespace(sleep=no_sleep))
