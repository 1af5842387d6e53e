"""The one path layer: local paths and gs:// / s3:// URLs (fsspec's gcsfs and s3fs, which read
each cloud's own environment: credentials, AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST).
Local paths go through os as before. An object is written in one upload: a streamed fsspec
file that an exception closes commits a truncated object, which a restart would trust.
Which client errors are worth another try is storage_errors' to tell; the retry loop is here."""
import contextlib
import os
import posixpath
import random
import shutil
import tempfile
import time
from typing import List, Sequence, Tuple

from clusiam_jax import storage_errors
from clusiam_jax.errors import DataError
from clusiam_jax.io_telemetry import Telemetry, telemetry  # noqa: F401 (storage.Telemetry)

SCHEMES = ('gs://', 's3://')
_ATTEMPTS, _FIRST_PAUSE_S = 6, 0.2
# Reads in flight per host: a bucket answers in tens of ms (docs/storage.md).
MAX_IN_FLIGHT = 64


def is_url(path) -> bool:
    return isinstance(path, str) and path.startswith(SCHEMES)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_url(base) else os.path.join(base, *parts)


def resolve(base: str, path: str) -> str:
    """`path` (a URL, absolute or relative to the folder `base`) as one normalised path or URL.
    Under a URL, a local absolute path or a '..' above the bucket is a DataError (no guessing)."""
    if is_url(path):
        return path
    if not is_url(base):
        return os.path.normpath(os.path.join(base, path))
    scheme, rest = base.split('://', 1)
    bucket = rest.split('/', 1)[0]
    if path.startswith('/'):
        raise DataError(f'{path} is a local path, relative to nothing in {scheme}://{bucket} '
                        f'(give a URL or a path relative to {base})')
    joined = posixpath.normpath(posixpath.join(rest, path))
    if _climbs(rest, path):
        raise DataError(f'{path} climbs above the bucket {scheme}://{bucket} (relative to {base})')
    return f'{scheme}://{joined}'


def _climbs(folder: str, path: str) -> bool:
    """Whether '..' in `path`, relative to `folder` ('bucket/a/b'), goes above the bucket."""
    depth = len([p for p in folder.split('/') if p]) - 1
    for part in path.split('/'):
        if part == '..':
            depth -= 1
            if depth < 0:
                return True
        elif part not in ('', '.'):
            depth += 1
    return False


def split(path: str) -> Tuple[str, str]:
    return posixpath.split(path.rstrip('/')) if is_url(path) else os.path.split(path)


def _filesystem(url: str):
    if url.startswith('gs://') and os.environ.get('STORAGE_EMULATOR_HOST'):
        # gcsfs asks the bucket type over gRPC, which an emulator never answers (60 s a call).
        os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
    import fsspec  # here: a local run never imports the cloud clients
    kwargs = ({'config_kwargs': {'max_pool_connections': MAX_IN_FLIGHT}}
              if url.startswith('s3://') else {})
    return fsspec.filesystem(url.split('://', 1)[0], **kwargs)


class Unreadable(DataError):
    """A missing object (no such object, 404): a pipeline skips it like a damaged file. An
    outage or bad credentials stay a plain DataError: they end a run (which then resumes
    exactly; skipping would make it read other batches than an undisturbed run)."""


def _retried(what: str, url: str, call):
    """call() with exponential backoff on transient failures; a lasting one is a DataError."""
    for attempt in range(_ATTEMPTS):
        try:
            return call()
        except Exception as e:  # cloud clients raise many types: sorted by storage_errors
            if not storage_errors.client_error(e):
                raise
            if not storage_errors.transient(e) or attempt == _ATTEMPTS - 1:
                telemetry.add(0, 0, 0.0, errors=1)
                gone = storage_errors.missing(e) and not storage_errors.forbidden(e)
                kind = Unreadable if gone else DataError
                raise kind(f'cannot {what} {url}: {storage_errors.reason(e)}') from None
            telemetry.add(0, 0, 0.0, retries=1)
            time.sleep(_FIRST_PAUSE_S * 2 ** attempt * (0.5 + random.random()))


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    return _retried('look up', path, lambda: _fresh(path).exists(path))


def isdir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    return _retried('look up', path, lambda: _fresh(path).isdir(path))


def isfile(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    return _retried('look up', path, lambda: _fresh(path).isfile(path))


def _fresh(path: str):
    """The filesystem of `path` with its cached listings of `path` and its folders dropped:
    another process (host) may have written or deleted it since they were listed here."""
    fs = _filesystem(path)
    fs.invalidate_cache(path)
    return fs


def listdir(path: str) -> List[str]:
    """Names in a folder (another host's writes included: the listing cache is dropped)."""
    if not is_url(path):
        return os.listdir(path)
    fs = _filesystem(path)
    fs.invalidate_cache(path)
    entries = _retried('list', path, lambda: fs.ls(path, detail=False))
    return sorted(posixpath.basename(e.rstrip('/')) for e in entries)


def makedirs(path: str) -> None:
    """A local folder; in a bucket folders are name prefixes, so only the bucket must exist."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)
        return
    bucket = path.split('://', 1)[0] + '://' + path.split('://', 1)[1].split('/', 1)[0]
    if not _retried('look up', bucket, lambda: _bucket_exists(_filesystem(path), bucket)):
        raise DataError(f'cannot write {path}: the bucket {bucket} does not exist')


def _bucket_exists(fs, bucket: str) -> bool:
    """s3fs's exists() answers False for any failure (403, 503 included): S3 is asked
    HEAD bucket itself, so that bad credentials and outages are told as what they are."""
    if not bucket.startswith('s3://'):
        return fs.exists(bucket)
    try:
        fs.call_s3('head_bucket', Bucket=bucket[len('s3://'):])
    except FileNotFoundError:
        return False
    return True


def read_bytes(path: str) -> bytes:
    if not is_url(path):
        with open(path, 'rb') as f:
            return f.read()
    start = time.perf_counter()
    data = _retried('read', path, lambda: _filesystem(path).cat_file(path))
    telemetry.add(1, len(data), time.perf_counter() - start)
    return data


def write_bytes(url: str, data: bytes) -> None:
    """One upload: the object appears whole or not at all."""
    _unfenced(url)
    _retried('write', url, lambda: _filesystem(url).pipe_file(url, data))


def upload(local_path: str, url: str, recursive: bool = False) -> None:
    """A file (or with `recursive` a folder's files, each one upload) to `url`."""
    _unfenced(url)
    fs = _filesystem(url)
    if not recursive:
        _retried('write', url, lambda: fs.put_file(local_path, url))
        return
    for folder, _, names in os.walk(local_path):
        for name in sorted(names):
            source = os.path.join(folder, name)
            target = join(url, *os.path.relpath(source, local_path).split(os.sep))
            _retried('write', target, lambda s=source, t=target: fs.put_file(s, t))


def download(url: str, local_path: str) -> None:
    start = time.perf_counter()
    _retried('read', url, lambda: _filesystem(url).get_file(url, local_path))
    telemetry.add(1, os.path.getsize(local_path), time.perf_counter() - start)


def remove(path: str, recursive: bool = False) -> None:
    if not is_url(path):
        if os.path.isdir(path) and recursive:
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        return
    _unfenced(path)
    fs = _filesystem(path)
    try:
        _retried('delete', path, lambda: fs.rm(path, recursive=recursive))
    except DataError:
        if _fresh(path).exists(path):
            raise


def read_ranges(path: str, ranges: Sequence[Tuple[int, int]]) -> List[bytes]:
    """The byte ranges [start, end) of one object or file, all requested at once (a bucket's
    latency is hidden by concurrency, not by a faster request)."""
    if not ranges:
        return []
    if not is_url(path):
        with open(path, 'rb') as f:
            out = []
            for start, end in ranges:
                f.seek(start)
                out.append(f.read(end - start))
            return out
    fs, begin = _filesystem(path), time.perf_counter()
    starts, ends = [s for s, _ in ranges], [e for _, e in ranges]
    data = _retried('read', path, lambda: fs.cat_ranges([path] * len(ranges), starts, ends,
                                                        on_error='raise'))
    telemetry.add(len(ranges), sum(map(len, data)), time.perf_counter() - begin)
    return data


def open_header(path: str):
    """A read-only file object for parsing a file's header over the network: small blocks,
    read ahead (fsspec's default reads 50 MiB at the first touch)."""
    if not is_url(path):
        return open(path, 'rb')
    return _retried('open', path, lambda: _filesystem(path).open(
        path, 'rb', block_size=2 ** 16, cache_type='readahead'))


@contextlib.contextmanager
def local_copy(path: str):
    """A local file with `path`'s bytes (a temporary download for a URL), for libraries that
    only read local files."""
    if not is_url(path):
        yield path
        return
    folder = tempfile.mkdtemp(prefix='clusiam-')
    try:
        local = os.path.join(folder, posixpath.basename(path.rstrip('/')))
        download(path, local)
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def create_bytes(url: str, data: bytes) -> bool:
    """One upload only if no object has the name (GCS ifGenerationMatch=0, S3 IfNoneMatch='*'):
    False when one exists. The lock of a work directory in a bucket, where no flock exists."""
    fs = _filesystem(url)

    def put():
        try:
            fs.pipe_file(url, data, mode='create')
        except FileExistsError:
            return False
        return True
    return _retried('create', url, put)


def copy(source: str, target: str) -> None:
    """One object, copied inside the store (no download)."""
    _unfenced(target)
    _retried('copy', source, lambda: _filesystem(source).copy(source, target))


def find_files(url: str) -> List[str]:
    """Every object under the folder `url` (fresh listing), as sorted paths relative to it."""
    fs = _filesystem(url)
    fs.invalidate_cache(url)
    root = url.split('://', 1)[1].rstrip('/') + '/'
    found = _retried('list', url, lambda: fs.find(url, withdirs=False))
    return sorted(f[len(root):] for f in found if f.startswith(root))


def _version_of(url: str, info: dict) -> str:
    """What tells one state of an object from another: GCS's generation (a new one at every
    write, kept by a metadata-only update, which changes GCS's ETag), S3's ETag (S3 has no
    metadata-only update: changing metadata copies the object)."""
    if url.startswith('gs://'):
        return str(info.get('generation') or '')
    return str(info.get('ETag') or info.get('etag') or '').strip('"')


def version(url: str) -> Tuple[int, str]:
    """(size, generation or ETag) of an object: what changes when it is written again (a
    rerun redoes it), and only then."""
    info = _retried('look up', url, lambda: _fresh(url).info(url))
    return int(info['size']), _version_of(url, info)


def object_version(url: str) -> str:
    """What `replace_bytes` and `remove_version` name: the object's GCS generation or S3
    ETag (quoted, as S3's If-Match takes it), looked up fresh."""
    info = _retried('look up', url, lambda: _fresh(url).info(url))
    return str(info.get('generation') if url.startswith('gs://') else info.get('ETag'))


def replace_bytes(url: str, data: bytes, version: str) -> bool:
    """One upload only if the object is still at `version` (GCS ifGenerationMatch, S3 IfMatch):
    False when another writer replaced or deleted it since (the bucket lock's lease)."""
    fs = _filesystem(url)

    def put():
        try:
            if url.startswith('s3://'):
                fs.pipe_file(url, data, IfMatch=version)
            else:  # gcsfs's pipe_file names no generation: its multipart upload, with one
                import json
                from urllib.parse import quote
                bucket, key, _ = fs.split_path(url)
                head = ('--==0==\nContent-Type: application/json; charset=UTF-8\n\n'
                        f'{json.dumps({"name": key})}\n--==0==\n'
                        'Content-Type: application/octet-stream\n\n').encode()
                fs.call('POST', f'{fs._location}/upload/storage/v1/b/{quote(bucket)}/o',
                        uploadType='multipart', ifGenerationMatch=version,
                        data=head + data + b'\n--==0==--', json_out=True,
                        headers={'Content-Type': 'multipart/related; boundary="==0=="'})
                fs.invalidate_cache(url)
        except (FileExistsError, FileNotFoundError):  # gcsfs's 412; the object deleted
            return False
        except OSError as e:
            if storage_errors.precondition_failed(e):
                return False
            raise
        return True
    return _retried('replace', url, put)


class ConditionRefused(DataError):
    """The store does not do this conditional request (501 Not Implemented: an S3-compatible
    server without conditional deletes)."""


def remove_version(url: str, version: str) -> bool:
    """Deletes the object only while it is at `version` (`object_version`; GCS
    ifGenerationMatch, S3 If-Match, which AWS takes on DELETE since September 2025): False
    when another writer replaced or deleted it since, ConditionRefused where the store does
    not take the condition. A server that ignores it (fake-gcs-server does) deletes anyway:
    whoever calls this has checked the object's content first."""
    _unfenced(url)
    fs = _filesystem(url)
    bucket, key, _ = fs.split_path(url)

    def delete():
        try:
            if url.startswith('s3://'):
                fs.call_s3('delete_object', Bucket=bucket, Key=key, IfMatch=version)
            else:
                fs.call('DELETE', 'b/{}/o/{}', bucket, key, ifGenerationMatch=version)
        except (FileExistsError, FileNotFoundError):  # gcsfs's 412; gone (either store)
            return False
        except Exception as e:  # sorted by status, as _retried sorts them
            if storage_errors.precondition_failed(e):
                return False
            if any(storage_errors.http_status(x) == 501
                   for x in (e, e.__context__) if x is not None):
                raise ConditionRefused(f'cannot delete {url} only at version {version}: the '
                                       f'store does not take the condition') from None
            raise
        finally:
            fs.invalidate_cache(url)
        return True
    return _retried('delete', url, delete)


# Folders this process must not write to any more, and why: its lock on them was taken over
# by another command (workdir_lock), whose files they are now.
_fences = {}


class Fenced(DataError):
    """A write into a folder this process no longer holds (see `fence`)."""


def fence(folder: str, why: str) -> None:
    """From now on, this process's writes, uploads and deletes under the bucket folder
    `folder` raise Fenced(`why`): they would overwrite another command's files."""
    _fences[folder.rstrip('/') + '/'] = why


def unfence(folder: str) -> None:
    _fences.pop(folder.rstrip('/') + '/', None)


def _unfenced(url: str) -> None:
    for prefix, why in list(_fences.items()):
        if url.startswith(prefix) or url.rstrip('/') + '/' == prefix:
            raise Fenced(f'cannot write {url}: {why}')


def versions(url: str, recursive: bool = True) -> dict:
    """{path relative to the folder `url`: version()} of its objects from one fresh listing
    (`recursive` False: only those directly in it): many objects' versions in one request."""
    fs = _filesystem(url)
    fs.invalidate_cache(url)
    root = url.split('://', 1)[1].rstrip('/') + '/'
    if recursive:
        found = _retried('list', url, lambda: fs.find(url, withdirs=False, detail=True))
    else:
        found = {e['name']: e for e in _retried('list', url, lambda: fs.ls(url, detail=True))
                 if e.get('type') == 'file'}
    return {name[len(root):]: (int(info['size']), _version_of(url, info))
            for name, info in sorted(found.items()) if name.startswith(root)}
