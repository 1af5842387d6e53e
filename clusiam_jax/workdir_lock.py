"""One command per folder: the lock a training run holds on its work directory, a tiling
on tile.out_dir and an export on its output folder.

Two trainings in one work directory both ran before this lock: their checkpoints raced
in orbax, metrics.csv got every epoch twice and log.txt interleaved. Now the second
command ends with one line naming the first (pid, host, start time, command line).

How: `fcntl.flock` on `<folder>/.clusiam.lock`. The kernel drops the lock when its
process ends, however it ends (SIGKILL, OOM kill, a crash), so a lock left by a dead
command is taken over with no guesswork; the file's text (host, pid, start time,
command) only serves the refusal message and the takeover notice. Linux NFS clients
(v4, and v3 with the lock manager) turn flock into locks the server shares between
hosts. Where the file system refuses flock (ENOLCK, EOPNOTSUPP: some FUSE and cluster
file systems, NFS without a lock manager) the lock falls back to creating the file with
O_EXCL, which every file system keeps exclusive; a lock file left by a dead command is
then recognised only when its host is this host and its pid is gone. A lock of another
host, or of a pid reused since, is refused with the path to delete by hand: guessing
that another host's run is dead could let two runs write one folder, the failure this
lock exists to prevent.

Limits: a file system mounted with NFS `nolock` (or Lustre's `localflock`) accepts
flock but keeps it on one host; two hosts then do not see each other's lock. A run of
several processes (train.distributed) locks in process 0 only: the other processes
write no run files of their own, and a second run's process 0 is refused.
"""
import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import tempfile
import time
from typing import Optional, Sequence

from clusiam_jax.errors import ConfigError

log = logging.getLogger('clusiam_jax')

LOCK_NAME = '.clusiam.lock'
# flock refused by the file system itself (not "held by someone"): use O_EXCL instead.
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}

# Folders this process holds, so that a nested hold of the same folder (an export into
# the work directory training holds) is a no-op instead of a refusal of itself.
_held = {}


def lock_path(folder: str) -> str:
    return os.path.join(folder, LOCK_NAME)


def _command(argv: Optional[Sequence[str]]) -> str:
    if argv is None:
        argv = [os.path.basename(sys.argv[0] or 'python')] + sys.argv[1:]
    else:
        argv = ['launch.py'] + list(argv)
    return ' '.join(argv)


def _holder_text(command: str) -> str:
    return json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                       'started': datetime.datetime.now().isoformat(timespec='seconds'),
                       'command': command}) + '\n'


def _parse_holder(text: str) -> Optional[dict]:
    try:
        holder = json.loads(text)
        int(holder['pid'])
        return holder
    except (ValueError, TypeError, KeyError):
        return None


def _read_holder(path: str, fd: Optional[int] = None, tries: int = 10) -> Optional[dict]:
    """The holder the lock file names. A holder writes its line just after it takes the
    lock, so an empty file is read again for a moment before giving up."""
    for attempt in range(tries):
        try:
            if fd is not None:
                text = os.pread(fd, 65536, 0).decode('utf-8', 'replace')
            else:
                with open(path, encoding='utf-8', errors='replace') as f:
                    text = f.read()
        except FileNotFoundError:
            return None
        holder = _parse_holder(text)
        if holder is not None or attempt == tries - 1:
            return holder
        time.sleep(0.05)
    return None


def describe(holder: Optional[dict]) -> str:
    """'pid 1234 on host X since 2024-05-01 10:02:11 (launch.py --mode train ...)'."""
    if holder is None:
        return 'a command that has not said who it is'
    started = str(holder.get('started', '?')).replace('T', ' ')
    text = f"pid {holder['pid']} on host {holder.get('host', '?')} since {started}"
    return text + (f" ({holder['command']})" if holder.get('command') else '')


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _flock_refused(folder: str) -> Optional[str]:
    """Why `folder`'s file system refuses flock, or None when it takes it. Probed on a
    file of its own: the lock file itself must not exist unless it locks."""
    with tempfile.TemporaryFile(dir=folder) as probe:
        try:
            fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in _NO_FLOCK:
                return e.strerror
            raise
    return None


class FolderLock:
    """An exclusive lock on `folder` (which must exist) for this process; `what` names
    the folder in the refusal, e.g. '--workdir'."""

    def __init__(self, folder: str, what: str, argv: Optional[Sequence[str]] = None):
        self.folder, self.what = folder, what
        self.path = lock_path(folder)
        self.command = _command(argv)
        self._fd = None
        self._flock = True

    def _refuse(self, holder, extra=''):
        raise ConfigError(f'{self.what} {self.folder} is in use by another command: '
                          f'{describe(holder)}; wait for it to end or use another folder'
                          f'{extra}')

    def acquire(self):
        """Takes the lock or raises ConfigError naming its holder."""
        refused = _flock_refused(self.folder)
        if refused is not None:
            log.info('%s: the file system does not support flock (%s); locking with an '
                     'exclusive lock file', self.folder, refused)
            self._flock = False
            return self._acquire_exclusive()
        for _ in range(10):  # a holder that unlinks the file as we open it: open again
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(self.path, fd)
                os.close(fd)
                self._refuse(holder)
            except BaseException:
                os.close(fd)
                raise
            # The holder before us unlinks the file on release: a lock on an unlinked
            # inode is no lock. Only the inode still under the name counts.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _parse_holder(os.pread(fd, 65536, 0).decode('utf-8', 'replace'))
            if previous is not None:
                log.info('%s %s: the previous command on it ended without releasing its '
                         'lock (%s); taking it over', self.what, self.folder,
                         describe(previous))
            self._write(fd)
            self._fd = fd
            return self
        raise ConfigError(f'{self.what} {self.folder}: cannot take its lock {self.path} '
                          f'(it keeps changing)')

    def _acquire_exclusive(self):
        """The O_EXCL fallback: the file's existence is the lock."""
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o644)
            except FileExistsError:
                holder = _read_holder(self.path)
                if holder is None:
                    if os.path.exists(self.path):
                        self._refuse(None, f' (or, if no command is running there, '
                                           f'delete {self.path})')
                    continue  # released as we looked
                if holder.get('host') == socket.gethostname() and \
                        not _pid_alive(int(holder['pid'])):
                    log.info('%s %s: taking over the lock of a command that is gone (%s)',
                             self.what, self.folder, describe(holder))
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)
                    continue
                self._refuse(holder, f' (if it is not running any more, delete '
                                     f'{self.path})')
            self._write(fd)
            self._fd = fd
            return self
        raise ConfigError(f'{self.what} {self.folder}: cannot take its lock {self.path} '
                          f'(it keeps changing)')

    def _write(self, fd):
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder_text(self.command).encode('utf-8'), 0)
        except OSError as e:  # a full disk: the one-line error names the file
            os.close(fd)
            raise OSError(e.errno, e.strerror, self.path) from None

    def release(self):
        """Removes the lock file (while still holding it, so that no one locks the
        doomed inode unnoticed) and drops the lock. A folder deleted meanwhile is fine."""
        if self._fd is None:
            return
        try:
            with contextlib.suppress(OSError):  # deleted with its folder, read-only now
                if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                    os.unlink(self.path)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


@contextlib.contextmanager
def hold(folder: str, what: str, argv: Optional[Sequence[str]] = None,
         enabled: bool = True, created: bool = False):
    """Holds `folder`'s lock for the body (`enabled=False`: no lock, e.g. processes
    other than 0 of a multi-process run). Holding a folder this process already holds
    is a no-op. `created`: the folder was made for this command, and goes again if the
    command leaves it empty (refused, or stopped by bad input before writing)."""
    key = os.path.realpath(folder)
    if not enabled or key in _held:
        yield None
        return
    try:
        lock = FolderLock(folder, what, argv).acquire()
    except BaseException:
        _remove_if_empty(folder, created)
        raise
    _held[key] = lock
    try:
        yield lock
    finally:
        del _held[key]
        lock.release()
        _remove_if_empty(folder, created)


def _remove_if_empty(folder, created):
    if created:
        with contextlib.suppress(OSError):  # not empty: the command wrote there
            os.rmdir(folder)
