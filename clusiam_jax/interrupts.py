"""SIGTERM and Ctrl-C (SIGINT): any command stops cleanly, at any moment.

Schedulers send SIGTERM before they evict a job; people press Ctrl-C. Outside training
(scanning data, computing statistics, compiling, exporting) there is nothing worth
saving, so the signal raises `Interrupted` at once and the command line prints one line.
Inside the training loop (`deferred()`), the signal only sets a flag: the loop finishes
the step in flight, saves a checkpoint and returns. A second signal while one is pending
stops at once without saving.

`Interrupted` is a BaseException, like KeyboardInterrupt, so `except Exception` blocks
on the way do not swallow it. Handlers can only be installed in the main thread; in
other threads (or when the caller installed none) these functions change nothing.
"""
import contextlib
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class _State:
    received = None     # the first signal of this command, or None
    deferring = 0       # > 0 inside deferred()


def _handle(signum, frame):
    first = _State.received is None
    if first:
        _State.received = signum
    if _State.deferring and first:
        return  # the loop checkpoints at the end of the step in flight
    raise Interrupted(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _signals(sigterm: bool):
    # Multi-process runs leave SIGTERM to JAX's preemption service, which turns it into
    # a step every process agrees on (train/loop.py).
    return SIGNALS if sigterm else (signal.SIGINT,)


def install(sigterm: bool = True) -> dict:
    """Make SIGTERM and SIGINT raise Interrupted (the command line, at start); returns
    the handlers they replace, for `restore`."""
    previous = {}
    if _in_main_thread():
        reset()
        for sig in _signals(sigterm):
            previous[sig] = signal.signal(sig, _handle)
    return previous


def restore(previous: dict, only=None):
    """Put back handlers `install` replaced (`only`: signal names, e.g. ('SIGTERM',))."""
    for sig, handler in previous.items():
        if only is None or signal.Signals(sig).name in only:
            signal.signal(sig, handler)


def received():
    """The signal number this command received, or None."""
    return _State.received


def reset():
    _State.received = None


@contextlib.contextmanager
def deferred(sigterm: bool = True):
    """Inside: a first SIGTERM/SIGINT only sets `received()` (poll it between steps).

    Starts with nothing received (a signal before it raised Interrupted already). Installs
    the handlers itself when the caller has not (train() called from Python), and puts
    back whatever was there before on exit.
    """
    reset()
    previous = {}
    if _in_main_thread():
        for sig in _signals(sigterm):
            previous[sig] = signal.signal(sig, _handle)
    _State.deferring += 1
    try:
        yield
    finally:
        _State.deferring -= 1
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ignore_in_worker(*_):
    """grain `worker_init_fn`: input workers ignore Ctrl-C. The terminal sends SIGINT to
    the whole process group; the main process decides when to stop and closes them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
