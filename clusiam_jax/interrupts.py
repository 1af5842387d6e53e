"""SIGTERM and Ctrl-C stop any command cleanly: the handler only records the signal; safe
points (`check()`) raise `Interrupted`, a watchdog ends code reaching none within `GRACE_S`,
the training loop (`deferred()`) saves first; a second signal stops at once."""
import contextlib
import functools
import os
import signal
import sys
import threading
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Long enough to reach the next safe point, short of a scheduler's grace period (>= 30 s).
GRACE_S = 10.0


class Interrupted(BaseException):
    def __init__(self, signum: int):
        self.signum, self.name = signum, signal.Signals(signum).name
        super().__init__(self.name)


def stop_message(name: str) -> str:
    return (f'stopped by {name}; start the same command again to continue (what was '
            f'finished is kept)')


class _State:
    received = None     # the first signal of this command (or stop notice), or None
    deferring = 0       # > 0 inside deferred()
    status = None       # exit status after a signal, set by install
    installed = False   # the command line's handlers are in place
    watchdog = None


def exit_now(status: int):
    """Flushes Python's buffers, then `os._exit` (tearing down XLA's threads crashed)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def _handle(signum, frame):
    if _State.received is not None:
        # Straight to the descriptor: the main thread may hold sys.stderr's lock.
        with contextlib.suppress(OSError):
            os.write(2, f'stopped by {signal.Signals(signum).name} again, at once, without a '
                        f'checkpoint of the step in flight; the last checkpoint stands\n'.encode())
        exit_now(128 + signum)
    _State.received = signum
    if not _State.deferring and _State.installed:
        _start_watchdog(signum)


def _start_watchdog(signum):
    def expire():
        if _State.deferring or _State.received is None:
            return  # the training loop took over the stop (or the command ended)
        with contextlib.suppress(OSError):
            os.write(2, (stop_message(signal.Signals(signum).name) + '\n').encode())
        exit_now(_State.status(signum))
    _State.watchdog = threading.Timer(GRACE_S, expire)
    _State.watchdog.daemon = True
    _State.watchdog.start()


def _cancel_watchdog():
    if _State.watchdog is not None:
        _State.watchdog.cancel()
        _State.watchdog = None


def install(status=lambda signum: 128 + signum) -> dict:
    """SIGNALS record a stop, exiting with `status(signum)`; returns the handlers replaced."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        reset()
        _State.status, _State.installed = status, True
        for sig in SIGNALS:
            # A signal the parent ignores stays ignored, as Python itself leaves it.
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, _handle)
    return previous


def restore(previous: dict):
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    if threading.current_thread() is threading.main_thread():
        _State.installed = False
        _cancel_watchdog()


def received():
    return _State.received


def check():  # a safe point
    if _State.received is not None and not _State.deferring and _State.installed:
        raise Interrupted(_State.received)


def note(signum: int):  # a stop decided elsewhere (JAX's multi-process preemption notice)
    _State.received = signum


def reset():
    _State.received = None
    _cancel_watchdog()


@contextlib.contextmanager
def deferred(enabled: bool = True):
    """Inside, `check()` does nothing: the training loop polls `received()`."""
    if not enabled:
        yield
        return
    previous = {}
    if threading.current_thread() is threading.main_thread() and not _State.installed:
        reset()
        previous = {sig: signal.signal(sig, _handle) for sig in SIGNALS}
    _State.deferring += 1
    _cancel_watchdog()  # the loop saves and stops: no hard exit
    try:
        yield
    finally:
        _State.deferring -= 1
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if _State.received is not None and not _State.deferring and _State.installed:
            _start_watchdog(_State.received)


def _init_worker(parent: int, *_):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def exit_when_orphaned():  # the parent pid changes when the parent dies, however
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)
    if os.getppid() != parent:  # killed while this worker was still starting
        os._exit(0)
    threading.Thread(target=exit_when_orphaned, daemon=True, name='exit-when-orphaned').start()


def worker_initializer():
    """Workers ignore the group's signals (this process stops them) and exit once it is gone."""
    return functools.partial(_init_worker, os.getpid())
