"""One command per folder: `flock` on `<folder>/.clusiam.lock`; where flock is refused, an
O_EXCL file, taken over only from a gone pid of this host; in a bucket, a lock object created
only if absent (no flock there), renewed by its holder, taken over when its lease ends."""
import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import pathlib
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from typing import Optional, Sequence

from clusiam_jax import interrupts, storage
from clusiam_jax.errors import ConfigError, DataError
from clusiam_jax.storage import Unreadable

log = logging.getLogger('clusiam_jax')

LOCK_NAME = '.clusiam.lock'
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
_held = {}  # folders this process holds: holding one again inside is no refusal of itself


def lock_path(folder: str) -> str:
    return storage.join(folder, LOCK_NAME)


def _read_holder(path: str, fd: Optional[int] = None, tries: int = 10) -> Optional[dict]:
    for attempt in range(tries):  # an empty lock file (being written) is read again
        try:
            raw = pathlib.Path(path).read_bytes() if fd is None else os.pread(fd, 65536, 0)
            holder = json.loads(raw.decode('utf-8', 'replace'))
            int(holder['pid'])
            return holder
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError):
            time.sleep(0.05 if attempt < tries - 1 else 0)
    return None


def describe(holder: Optional[dict]) -> str:
    if holder is None:
        return 'a command that has not said who it is'
    started = str(holder.get('started', '?')).replace('T', ' ')
    text = f"pid {holder['pid']} on host {holder.get('host', '?')} since {started}"
    return text + (f" ({holder['command']})" if holder.get('command') else '')


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


class FolderLock:
    """An exclusive lock on `folder` (which must exist); `what` names it in the refusal."""

    def __init__(self, folder: str, what: str, argv: Optional[Sequence[str]] = None):
        self.folder, self.what, self.path = folder, what, lock_path(folder)
        argv = (['launch.py', *argv] if argv is not None
                else [os.path.basename(sys.argv[0] or 'python'), *sys.argv[1:]])
        self.command = ' '.join(argv)
        self._fd = None

    def _refuse(self, holder, extra=''):
        raise ConfigError(f'{self.what} {self.folder} is in use by another command: '
                          f'{describe(holder)}; wait for it to end or use another folder{extra}')

    def acquire(self):
        take = self._take_flock  # unless the file system refuses flock (probed on a file apart)
        with tempfile.TemporaryFile(dir=self.folder) as probe:
            try:
                fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    raise
                log.info('%s: the file system does not support flock (%s); locking with an '
                         'exclusive lock file', self.folder, e.strerror)
                take = self._take_exclusive
        for _ in range(10):  # None: the lock file changed as we looked; look again
            fd = take()
            if fd is not None:
                self._write(fd)
                self._fd = fd
                return self
        raise ConfigError(f'{self.what} {self.folder}: cannot take its lock {self.path} '
                          f'(it keeps changing)')

    def _take_flock(self) -> Optional[int]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # A holder unlinks the file on release: only the inode under the name counts.
            if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                previous = _read_holder(self.path, fd, tries=1)
                if previous is not None:
                    log.info('%s %s: the previous command on it ended without releasing '
                             'its lock (%s); taking it over', self.what, self.folder,
                             describe(previous))
                fd, taken = None, fd
                return taken
        except BlockingIOError:
            self._refuse(_read_holder(self.path, fd))
        except FileNotFoundError:
            pass
        finally:
            if fd is not None:
                os.close(fd)
        return None

    def _take_exclusive(self) -> Optional[int]:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            holder = _read_holder(self.path)
        if holder is None:
            if os.path.exists(self.path):
                self._refuse(None, f' (or, if no command is running there, delete {self.path})')
            return None  # released as we looked
        if holder.get('host') != socket.gethostname() or pid_alive(int(holder['pid'])):
            self._refuse(holder, f' (if it is not running any more, delete {self.path})')
        log.info('%s %s: taking over the lock of a command that is gone (%s)', self.what,
                 self.folder, describe(holder))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        return None

    def _write(self, fd):
        text = json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                           'started': datetime.datetime.now().isoformat(timespec='seconds'),
                           'command': self.command}) + '\n'
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, text.encode('utf-8'), 0)
        except OSError as e:  # a full disk: the one-line error names the file
            os.close(fd)
            raise OSError(e.errno, e.strerror, self.path) from None

    def release(self):
        if self._fd is None:
            return
        try:
            with contextlib.suppress(OSError):  # deleted with its folder, read-only now
                if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                    os.unlink(self.path)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


class BucketLock(FolderLock):
    """The lock of a folder in a bucket: an object uploaded only if none has its name (GCS
    ifGenerationMatch=0, S3 IfNoneMatch='*'). No process keeps it alive as a flock is, so the
    holder renews it every RENEW_S; one not renewed for STALE_S (a host killed or preempted;
    host clocks agree to seconds) is taken over, as is one of a gone pid of this host. Renewal,
    takeover and release act only on the version read (generation / ETag): of two commands
    taking over one lease, one wins, and a release never deletes a lock taken over since it
    looked. A holder that loses its lease writes nothing more to the folder (storage.fence)
    and stops at the next safe point; training checks the lease (`check_lease`) before each
    checkpoint and epoch row, renewing it, so that a write it starts has a whole lease."""
    RENEW_S, STALE_S = 60.0, 600.0

    def acquire(self):
        self._token = uuid.uuid4().hex  # ours: a retried upload that had landed finds itself
        self._started = datetime.datetime.now().isoformat(timespec='seconds')
        self.lost = self._reported = False
        self._renewing = threading.Lock()   # the renewal thread and check() take turns
        for _ in range(10):
            if storage.create_bytes(self.path, self._text()):
                return self._held()
            try:
                version, holder = self._read()
            except Unreadable:
                continue  # released as we looked (an outage is a DataError: it ends here)
            except (ValueError, TypeError, KeyError):
                self._refuse(None, f' (or, if no command is running there, delete {self.path})')
            if holder.get('token') == self._token:
                return self._held()
            age = time.time() - float(holder.get('renewed', time.time()))
            gone = (holder.get('host') == socket.gethostname()
                    and not pid_alive(int(holder['pid'])))
            if not gone and age <= self.STALE_S:
                self._refuse(holder, f' (if it is not running any more, delete {self.path}, '
                                     f'or wait {self.STALE_S - age:.0f} s: its lease ends)')
            # Only the version we judged: another command taking it over first wins.
            if storage.replace_bytes(self.path, self._text(), version):
                log.info('%s %s: took over the lock of a command that is gone (%s%s)',
                         self.what, self.folder, describe(holder),
                         '' if gone else f'; not renewed for {age:.0f} s')
                return self._held()
        raise ConfigError(f'{self.what} {self.folder}: cannot take its lock {self.path} '
                          f'(it keeps changing)')

    def _text(self) -> bytes:
        return (json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                            'token': self._token, 'started': self._started,
                            'renewed': time.time(), 'command': self.command}) + '\n').encode()

    def _read(self):
        """(version, holder): the version first, so a holder newer than it fails to replace."""
        version = storage.object_version(self.path)
        holder = json.loads(storage.read_bytes(self.path).decode('utf-8', 'replace'))
        int(holder['pid'])
        return version, holder

    def _held(self):
        storage.unfence(self.folder)  # held again: an earlier loss here is over
        self._fd, self._stop = self._token, threading.Event()
        self._renewer = threading.Thread(target=self._renew, daemon=True,
                                         name='clusiam-lock-renewal')
        self._renewer.start()
        return self

    def _renew_once(self) -> bool:
        """Renews the lease if the lock is still ours (the version read, replaced only at that
        version); False when another command holds it (or it was deleted)."""
        with self._renewing:
            if self.lost:
                return False
            try:
                version, holder = self._read()
                if (holder.get('token') == self._token
                        and storage.replace_bytes(self.path, self._text(), version)):
                    return True
            except Unreadable:  # deleted: another command may hold the folder by now
                pass
            self._lose()
            return False

    def _renew(self):
        while not self._stop.wait(self.RENEW_S):
            try:
                if not self._renew_once():
                    return
            except (DataError, ValueError, TypeError, KeyError) as e:  # tried again next time
                log.warning('%s: could not renew the lock %s (%s)', self.folder, self.path, e)

    def check(self):
        """Raises LeaseLost if the lock is no longer ours; renews it otherwise (a lock object
        that is no lock of ours any more, unreadable JSON included, is lost). An outage is
        the storage's DataError: a write now would fail alike."""
        try:
            held = self._renew_once()
        except DataError:
            raise
        except (ValueError, TypeError, KeyError):   # no lock of ours in the object now
            with self._renewing:
                self._lose()
            held = False
        if not held:
            self._reported = True
            raise LeaseLost(self._lost_message())

    def _lose(self):
        """Another command took the folder over (we stalled past the lease): write nothing
        more there, and stop."""
        if self.lost:
            return
        self.lost = True
        storage.fence(self.folder, f'another command took over the lock of {self.what} '
                                   f'{self.folder}')
        log.warning('%s %s: another command took over its lock %s; stopping at the next safe '
                    'point, writing nothing more there', self.what, self.folder, self.path)
        interrupts.note(signal.SIGTERM)

    def _lost_message(self) -> str:
        return (f'{self.what} {self.folder}: another command took over its lock (this one '
                f'stalled past the {self.STALE_S:.0f} s lease) and this one stopped, writing '
                f'nothing more there; check which run the folder holds now')

    def release(self):
        if self._fd is None:
            return
        self._stop.set()
        self._renewer.join()
        try:
            if not self.lost:
                self._delete_if_ours()
        except (DataError, ValueError, TypeError, KeyError) as e:
            log.warning('%s: could not release the lock %s (%s); delete it before the next '
                        'command there', self.folder, self.path, e)
        finally:
            self._fd = None
        if self.lost and not self._reported:  # said once: check() may have raised it
            self._reported = True
            raise LeaseLost(self._lost_message())

    def _delete_if_ours(self):
        """Deletes the lock only at the version whose token was ours: a command that took it
        over after that look keeps it (the store refuses the delete). Where the store does
        not take the condition, the delete follows the look unconditionally, and a takeover
        in the milliseconds between them would lose its lock; a store that ignores the
        condition (fake-gcs-server) leaves that same window."""
        try:
            version, holder = self._read()
        except Unreadable:
            return   # already gone
        if holder.get('token') != self._token:
            return   # not ours any more: not ours to free
        try:
            deleted = storage.remove_version(self.path, version)
        except storage.ConditionRefused:
            storage.remove(self.path)
            return
        if not deleted:
            log.info('%s: the lock %s changed as it was released (taken over, or gone); left '
                     'as it is', self.folder, self.path)


class LeaseLost(ConfigError):
    """This command's lock on a bucket folder was taken over by another command."""


def check_lease(folder: str) -> None:
    """Before a write a restart would trust (a checkpoint, an epoch's row): LeaseLost if this
    process's lock on the bucket folder `folder` was taken over, else the lease renewed, so
    that the write has a whole lease (STALE_S) to finish in. A local folder's flock cannot be
    lost, and a folder this process does not hold (the other processes of a pod: process 0
    holds it) has nothing to check."""
    lock = _held.get(folder.rstrip('/')) if storage.is_url(folder) else None
    if isinstance(lock, BucketLock):
        lock.check()


@contextlib.contextmanager
def hold(folder: str, what: str, argv: Optional[Sequence[str]] = None,
         enabled: bool = True, created: bool = False):
    """Holds `folder`'s lock (unless held here); a `created` folder left empty is removed."""
    remote = storage.is_url(folder)
    key = folder.rstrip('/') if remote else os.path.realpath(folder)
    if not enabled or key in _held:
        yield None
        return
    try:
        _held[key] = (BucketLock if remote else FolderLock)(folder, what, argv).acquire()
        yield _held[key]
    finally:
        lock = _held.pop(key, None)
        if lock is not None:
            lock.release()
        if created and not remote:
            with contextlib.suppress(OSError):  # not empty: the command wrote there
                os.rmdir(folder)
