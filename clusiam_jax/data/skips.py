"""The record of skipped (unreadable) files: logged once, listed in the workdir.

Several grain worker processes may meet the same bad file (in different
epochs), so the list file is the shared memory: a path is appended under an
exclusive ``flock`` only if it is not listed yet, and only the process that
appends it logs the warning. Skips are rare, so reading the file each time
costs nothing that matters.
"""
import fcntl
import logging
import os
from typing import List, Optional

SKIPPED_FILES = 'skipped_files.txt'

logger = logging.getLogger(__name__)


class SkipLog:
    """Picklable (for worker processes): holds only the list file's path."""

    def __init__(self, list_path: Optional[str]):
        self.list_path = list_path
        self._seen = set()

    def __getstate__(self):
        return {'list_path': self.list_path}

    def __setstate__(self, state):
        self.list_path = state['list_path']
        self._seen = set()

    def record(self, path: str, reason: str) -> None:
        """Notes one unreadable file; logs it the first time any process sees it."""
        if path in self._seen:
            return
        self._seen.add(path)
        if self.list_path is None or _append_once(self.list_path, path):
            logger.warning('skipping %s (%s)', path, reason)

    def paths(self) -> List[str]:
        return read_list(self.list_path) if self.list_path else sorted(self._seen)


def _append_once(list_path: str, path: str) -> bool:
    os.makedirs(os.path.dirname(os.path.abspath(list_path)), exist_ok=True)
    with open(list_path, 'a+') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            if path in set(f.read().splitlines()):
                return False
            f.write(path + '\n')
            f.flush()
            return True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_list(list_path: str) -> List[str]:
    if not os.path.exists(list_path):
        return []
    with open(list_path) as f:
        return [line for line in f.read().splitlines() if line]
