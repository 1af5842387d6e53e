"""The one file-I/O module: atomic writes, CSV, and outside failures told in one line; a path
may be a gs:// or s3:// URL (storage.py). No JAX: grain workers use it too."""
import contextlib
import csv
import errno
import io
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from clusiam_jax import storage
from clusiam_jax.errors import ConfigError, DataError


@contextlib.contextmanager
def atomic_write(path: str, folder: bool = False):
    """Yields `<path>.tmp<pid>` (a new hidden folder beside `path` with folder=True),
    renamed onto `path` (a folder: a missing or empty one) only if the body finishes.
    For a URL: a local temporary, uploaded in one piece (a folder: file by file) at the end."""
    if storage.is_url(path):
        with tempfile.TemporaryDirectory(prefix='clusiam-') as local:
            tmp = local if folder else os.path.join(local, storage.split(path)[1])
            yield tmp
            storage.upload(tmp, path, recursive=folder)
        return
    if folder:
        parent, name = os.path.split(os.path.abspath(path))
        tmp = tempfile.mkdtemp(prefix=f'.{name}.tmp{os.getpid()}-', dir=parent)
    else:
        tmp = f'{path}.tmp{os.getpid()}'
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    with atomic_write(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)


def write_json(path: str, obj, **dump_kwargs) -> None:
    write_text(path, json.dumps(obj, **{'indent': 2, **dump_kwargs}) + '\n')


def write_csv(path: str, columns: Sequence[str], rows: Iterable[dict]) -> None:
    with atomic_write(path) as tmp, open(tmp, 'w', newline='', encoding='utf-8') as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def read_csv_rows(path: str, what: str = 'CSV file') -> Tuple[List[str], List[Dict[str, str]]]:
    """(stripped column names, rows) of a UTF-8 CSV; `what` names it in the DataError."""
    if not storage.isfile(path):
        raise DataError(f'{what} not found: {path}')
    try:
        raw = storage.read_bytes(path)
    except OSError as e:
        raise DataError(f'{what} {path}: cannot read it ({e.strerror})') from None
    try:
        text = raw.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        line = raw.count(b'\n', 0, e.start) + 1
        raise DataError(f'{what} {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at '
                        f'position {e.start}, line {line}): save it as UTF-8 CSV (in Excel: '
                        f'"CSV UTF-8")') from None
    try:
        reader = csv.DictReader(io.StringIO(text, newline=''))
        columns = [c.strip() for c in (reader.fieldnames or ())]
        reader.fieldnames = columns
        rows = list(reader)
    except csv.Error as e:
        raise DataError(f'{what} {path} is not a readable CSV file (line '
                        f'{reader.line_num}: {e})') from None
    return columns, rows


def read_path_csv(path: str, what: str, expected: str) -> Tuple[List[str], List[Dict[str, str]]]:
    """read_csv_rows, each row's `path` normalised against the CSV's folder; `expected`: columns."""
    base = storage.split(path if storage.is_url(path) else os.path.abspath(path))[0]
    columns, rows = read_csv_rows(path, what)
    if 'path' not in columns:
        raise DataError(f'{what} {path} has no "path" column (columns: {columns}); '
                        f'expected {expected}')
    for line, row in enumerate(rows, start=2):
        raw = (row.get('path') or '').strip()
        if not raw:
            raise DataError(f'{path}:{line}: empty "path"')
        try:
            row['path'] = storage.resolve(base, raw)
        except DataError as e:   # a local path, or one above the bucket, in a bucket's CSV
            raise DataError(f'{path}:{line}: {e}') from None
    return columns, rows


# The disk or the folder failed, not the input or the code.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOENT, errno.EACCES,
                      errno.EPERM, errno.EIO, errno.EFBIG, errno.ESTALE}
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
_ADVICE = {
    errno.ENOSPC: 'free some space and start the same command again',
    errno.EDQUOT: 'free some of your quota and start the same command again',
    errno.EFBIG: 'the file system cannot hold a file that large',
    errno.EROFS: 'the file system is read-only (remounted after an error?)',
    errno.ENOENT: 'was the folder moved or deleted while the command ran?',
    errno.EACCES: 'check the permissions of the folder',
    errno.EPERM: 'check the permissions of the folder',
    errno.ESTALE: 'the network file system dropped the file; start the command again',
    errno.EIO: 'the storage failed to read or write; check the disk',
}
# TensorStore (orbax's writer) wraps an OS error: '... "/run/...": ... [os_error_code='28']',
_TENSORSTORE_CODE = re.compile(r"\[os_error_code='?(\d+)'?\]")
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')
# or gives only its status: 'NOT_FOUND: ... at local file "/run/...": ...'.
_STATUS_ERRNO = {'NOT_FOUND': errno.ENOENT, 'PERMISSION_DENIED': errno.EACCES}
_TENSORSTORE_STATUS = re.compile(r'(NOT_FOUND|PERMISSION_DENIED): ')
_LOCAL_FILE = re.compile(r'local file "(/[^"]+)"')
_ORBAX_TMP = re.compile(r'\.orbax-checkpoint-tmp.*$')
# atomic_write's temporary name: the user knows the file by its final name.
_ATOMIC_TMP = re.compile(r'\.tmp\d+$')


def _errno_and_path(error: BaseException) -> Tuple[Optional[int], Optional[str]]:
    if isinstance(error, OSError):
        path = error.filename
        if path is None:  # h5py's OSError carries the path in its text only
            found = re.search(r"name = '([^']+)'", str(error))
            path = found.group(1) if found else None
        return error.errno, (os.fsdecode(path) if path is not None else None)
    text = str(error)
    found = _TENSORSTORE_CODE.search(text)
    if found is not None:
        paths = _QUOTED_PATH.findall(text[:found.start()])
        return int(found.group(1)), (paths[-1] if paths else None)
    # Without the OS's code (a file gone from under a write in flight): the status.
    status = _TENSORSTORE_STATUS.match(text) if isinstance(error, ValueError) else None
    local = _LOCAL_FILE.search(text)
    if status is None or local is None:
        return None, None
    return _STATUS_ERRNO[status.group(1)], local.group(1)


def environment_failure(error: BaseException) -> Optional[str]:
    """One line for an OS error of ENVIRONMENT_ERRNOS behind `error`; None: a bug's traceback."""
    seen, pending = set(), [(error, ENVIRONMENT_ERRNOS)]
    while pending:
        current, accepted = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        code, path = _errno_and_path(current)
        if code in accepted:
            return _message(code, path)
        pending += [(current.__cause__, accepted),
                    (current.__context__, _WRITE_ERRNOS | {errno.EIO})]
    return None


def _message(code: int, path: Optional[str]) -> str:
    head = os.strerror(code)
    if path is not None:
        checkpoint = _ORBAX_TMP.sub('', path)
        target = f'the checkpoint {checkpoint}' if checkpoint != path else _ATOMIC_TMP.sub('', path)
        head = f'{"cannot write" if code in _WRITE_ERRNOS else "cannot access"} {target}: {head}'
    return f'{head} ({errno.errorcode.get(code, code)}); {_ADVICE[code]}'


@contextlib.contextmanager
def quiet_environment_tracebacks():
    def drop_traceback(record):  # absl records of environment failures (orbax: one a thread)
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and environment_failure(exc) is not None:
            record.exc_info, record.exc_text = None, None
        return True
    logger = logging.getLogger('absl')
    logger.addFilter(drop_traceback)
    try:
        yield
    finally:
        logger.removeFilter(drop_traceback)


def remove_temporaries(folder: str) -> None:
    """Deletes atomic_write's temporaries that a killed process left in `folder`."""
    for name in os.listdir(folder):
        if _ATOMIC_TMP.search(name):
            os.remove(os.path.join(folder, name))


def writable_folder(path: str, flag: str) -> None:
    if storage.is_url(path):
        probe = storage.join(path, f'.write-test-{os.getpid()}')
        try:
            storage.makedirs(path)
            storage.write_bytes(probe, b'')
            storage.remove(probe)
        except DataError as e:
            raise ConfigError(f'{flag} {path}: cannot write there ({e})') from None
        return
    if os.path.isfile(path):
        raise ConfigError(f'{flag} {path} is a file, not a folder')
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(f'{flag} {path}: cannot write there ({e.strerror})') from None


def cache_root(kind: str = '') -> str:
    """This host's cache folder for `kind` (slides, datasets, stats, staging):
    $XDG_CACHE_HOME/clusiam_jax/<kind> (~/.cache by default), absolute."""
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    root = os.path.join(os.path.abspath(base), 'clusiam_jax')
    return os.path.join(root, kind) if kind else root
