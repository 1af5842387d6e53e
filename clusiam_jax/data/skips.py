"""The workdir's list of skipped (unreadable) files, shared by worker processes: a path is
appended under a flock only if not listed yet, and only the process appending it logs."""
import fcntl
import logging
import os
from typing import List, Optional

SKIPPED_FILES = 'skipped_files.txt'

logger = logging.getLogger(__name__)


class SkipLog:
    """Pickles as the list file's path alone (for worker processes)."""

    def __init__(self, list_path: Optional[str]):
        self.list_path, self._seen = list_path, set()

    def __reduce__(self):
        return SkipLog, (self.list_path,)

    def record(self, path: str, reason: str) -> None:
        """Notes an unreadable file; logged the first time any process sees it."""
        if path in self._seen:
            return
        self._seen.add(path)
        if self.list_path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(self.list_path)), exist_ok=True)
            with open(self.list_path, 'a+') as f:   # closing it (flushed) releases the lock
                fcntl.flock(f, fcntl.LOCK_EX)
                f.seek(0)
                if path in f.read().splitlines():
                    return
                f.write(path + '\n')
        logger.warning('skipping %s (%s)', path, reason)

    def paths(self) -> List[str]:
        if not self.list_path:
            return sorted(self._seen)
        if not os.path.exists(self.list_path):
            return []
        with open(self.list_path) as f:
            return [line for line in f.read().splitlines() if line]

