"""SIGTERM and Ctrl-C (SIGINT): any command stops cleanly, at any moment.

Schedulers send SIGTERM before they evict a job; people press Ctrl-C. Outside training
(listing data, computing statistics, compiling, exporting) there is nothing worth saving,
so the signal raises `Interrupted` as soon as Python runs again (a compile in progress
finishes first) and the command line prints one line. Inside the training loop
(`deferred()`), a first signal only sets a flag: the loop finishes the step in flight,
saves a checkpoint and returns. A second signal while one is pending raises at once,
without saving (`Interrupted.forced`).

`Interrupted` is a BaseException, like KeyboardInterrupt, so `except Exception` blocks
on the way do not swallow it. Handlers can only be installed in the main thread; in
other threads these functions change nothing.
"""
import contextlib
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    def __init__(self, signum: int, forced: bool = False):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.forced = signum, forced

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class _State:
    received = None     # the first signal of this command (or stop notice), or None
    deferring = 0       # > 0 inside deferred()


def _handle(signum, frame):
    if _State.deferring:
        if _State.received is None:
            _State.received = signum
            return  # the loop checkpoints at the end of the step in flight
        raise Interrupted(signum, forced=True)
    _State.received = signum
    raise Interrupted(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def install(signals=SIGNALS) -> dict:
    """Make `signals` raise Interrupted (the command line, at start); returns the
    handlers they replace, for `restore`."""
    previous = {}
    if _in_main_thread():
        reset()
        for sig in signals:
            previous[sig] = signal.signal(sig, _handle)
    return previous


def restore(previous: dict):
    """Put back the handlers `install` replaced."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def received():
    """The signal number this command received (or a stop notice recorded with
    `note`), or None."""
    return _State.received


def note(signum: int):
    """Records a stop decided elsewhere (JAX's multi-process preemption notice) as if
    `signum` had been received."""
    _State.received = signum


def reset():
    _State.received = None


@contextlib.contextmanager
def deferred(enabled: bool = True):
    """Inside: a first SIGTERM/SIGINT only sets `received()` (poll it between steps).

    Starts with nothing received (a signal before it raised Interrupted already). Installs
    the handlers itself (train() called from Python has none) and puts back whatever was
    there before on exit. `enabled=False` (several processes, which must agree on the
    step to save at: JAX's preemption sync does that for SIGTERM) changes nothing.
    """
    if not enabled:
        yield
        return
    reset()
    previous = install()
    _State.deferring += 1
    try:
        yield
    finally:
        _State.deferring -= 1
        restore(previous)


def ignore_in_worker(*_):
    """grain `worker_init_fn`: input workers ignore Ctrl-C. The terminal sends SIGINT to
    the whole process group; the main process decides when to stop and closes them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
