"""The workdir's list of skipped (unreadable) files, shared by worker processes: a path is
appended under a flock only if not listed yet, and only the process appending it logs.
In a bucket (no append, no flock) the workers of a host take turns under a flock on a local
file, which holds only the lines not uploaded yet (an upload failed); each new path rewrites
the whole object (its current lines first): skips are rare, so one upload each.
In a bucket each of several processes (hosts) writes its own skipped_files-<process>.txt."""
import fcntl
import hashlib
import logging
import os
import sys
import tempfile
from typing import List, Optional

from clusiam_jax import storage
from clusiam_jax.errors import DataError

SKIPPED_FILES = 'skipped_files.txt'

logger = logging.getLogger(__name__)


def _local_copy(url: str) -> str:
    """The same file for every process of this host that lists into `url`."""
    name = hashlib.sha1(url.encode('utf-8')).hexdigest()[:16] + '-' + storage.split(url)[1]
    return os.path.join(tempfile.gettempdir(), 'clusiam-skips', name)


def _process_list(url: str) -> str:
    """skipped_files-<process>.txt of a bucket list when several processes run (no host
    rewrites another's object: a read-modify-write of one shared object would drop lines)."""
    folder, name = storage.split(url)
    jax = sys.modules.get('jax')   # a process that never imported jax is the only one
    if name != SKIPPED_FILES or jax is None or jax.process_count() == 1:
        return url
    stem, ext = os.path.splitext(SKIPPED_FILES)
    return storage.join(folder, f'{stem}-{jax.process_index()}{ext}')


class SkipLog:
    """Pickles as the list file's path alone (for worker processes)."""

    def __init__(self, list_path: Optional[str], per_process: bool = True):
        if per_process and storage.is_url(list_path):
            list_path = _process_list(list_path)
        self.list_path, self._seen = list_path, set()

    def __reduce__(self):   # a worker keeps the name its process chose
        return SkipLog, (self.list_path, False)

    def record(self, path: str, reason: str) -> None:
        """Notes an unreadable file; logged the first time any process sees it."""
        if path in self._seen:
            return
        self._seen.add(path)
        if self.list_path is not None and not self._append(path):
            return
        logger.warning('skipping %s (%s)', path, reason)

    def _append(self, path: str) -> bool:
        """False if `path` was listed already."""
        remote = storage.is_url(self.list_path)
        local = _local_copy(self.list_path) if remote else self.list_path
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        with open(local, 'a+') as f:   # closing it (flushed) releases the lock
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            listed = f.read().splitlines()
            if not remote:
                if path in listed:
                    return False
                f.write(path + '\n')
                return True
            known = self._remote_lines()   # the object as it is now (cleared, perhaps)
            listed = known + [p for p in listed if p and p not in known]
            if path in listed:
                return False
            text = '\n'.join(listed + [path]) + '\n'
            f.seek(0)
            f.truncate()
            try:
                storage.write_bytes(self.list_path, text.encode('utf-8'))
            except DataError as e:  # kept here: the next skipped file uploads it again
                f.write(text)
                logger.warning('%s; the list stays in %s until the next skipped file', e, local)
            return True

    def _remote_lines(self) -> List[str]:
        if not storage.isfile(self.list_path):
            return []
        return [line for line in storage.read_bytes(self.list_path).decode(
            'utf-8', 'replace').splitlines() if line]

    def paths(self) -> List[str]:
        if not self.list_path:
            return sorted(self._seen)
        if storage.is_url(self.list_path):
            return self._remote_lines()
        if not os.path.exists(self.list_path):
            return []
        with open(self.list_path) as f:
            return [line for line in f.read().splitlines() if line]
