"""SIGTERM and Ctrl-C (SIGINT): any command stops cleanly, at any moment.

Schedulers send SIGTERM before they evict a job; people press Ctrl-C. The handler only
records the signal: it never raises. Raising from a signal handler lands the exception
in whatever Python code runs at that instant — an orbax restore (which then looked like
a damaged checkpoint), a JAX garbage-collection callback (which swallows it: "Exception
ignored in _xla_gc_callback"), a thread pool's bookkeeping — and a command unwinding
from there while XLA's compile threads were still running crashed the interpreter at
exit. So:

- Outside the training loop there is nothing worth saving: `check()`, called at safe
  points (between phases, slides, batches, checkpoint tries), raises `Interrupted`,
  which unwinds through the `finally` blocks and ends in one line from the command line.
  Code that runs longer than `GRACE_S` without reaching a safe point (a first compile, a
  long native call) is ended by a watchdog thread with the same line and exit status,
  without unwinding: every file the product writes appears under its final name only
  when complete, so nothing half-written is left to trust.
- Inside the training loop (`deferred()`), `check()` does nothing: the loop polls
  `received()` between steps, finishes the step in flight, saves a checkpoint and
  returns.
- A second signal while one is pending stops the process at once, without saving (the
  last checkpoint stands).
- The command line leaves through `exit_now` after a signal: `os._exit` after flushing,
  so the interpreter does not tear down native threads (XLA, orbax, grain) mid-flight.

`Interrupted` is a BaseException, like KeyboardInterrupt, so `except Exception` blocks
on the way do not swallow it. Handlers can only be installed in the main thread; in
other threads these functions change nothing.
"""
import contextlib
import functools
import os
import signal
import sys
import threading
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# How long code outside the training loop may run after a signal before the watchdog
# ends the process: long enough for the next safe point of any phase that has them,
# short enough that a scheduler's grace period (typically 30 s or more) is not used up.
GRACE_S = 10.0


class Interrupted(BaseException):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def stop_message(name: str) -> str:
    return (f'stopped by {name}; start the same command again to continue (what was '
            f'finished is kept)')


def _default_status(signum: int) -> int:
    return 128 + signum


class _State:
    received = None     # the first signal of this command (or stop notice), or None
    deferring = 0       # > 0 inside deferred()
    status = staticmethod(_default_status)   # exit status after a signal (the command's)
    installed = False   # the command line's handlers are in place (watchdog and exits)
    watchdog = None


def _write_stderr(text: str):
    """Straight to the file descriptor: a handler may run while the main thread holds
    sys.stderr's buffer lock."""
    try:
        os.write(2, (text + '\n').encode())
    except OSError:
        pass


def exit_now(status: int):
    """Leaves the process without interpreter teardown: flushes what Python buffered,
    then `os._exit`. Native threads (compiles, checkpoint writers, input workers' feeder
    threads) are not unwound mid-flight, which is what crashed exits after a signal."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def _handle(signum, frame):
    if _State.received is not None:
        _write_stderr(f'stopped by {signal.Signals(signum).name} again, at once, without a '
                      f'checkpoint of the step in flight; the last checkpoint stands')
        exit_now(128 + signum)
    _State.received = signum
    if not _State.deferring and _State.installed:
        _start_watchdog(signum)


def _start_watchdog(signum):
    def expire():
        if _State.deferring or _State.received is None:
            return  # the training loop took over the stop (or the command ended)
        _write_stderr(stop_message(signal.Signals(signum).name))
        exit_now(_State.status(signum))
    timer = threading.Timer(GRACE_S, expire)
    timer.daemon = True
    timer.start()
    _State.watchdog = timer


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def install(signals=SIGNALS, status=_default_status) -> dict:
    """Make `signals` record a stop (the command line, at start); `status(signum)` is the
    exit status of a command stopped by one. Returns the handlers they replace, for
    `restore`."""
    previous = {}
    if _in_main_thread():
        reset()
        _State.status = staticmethod(status)
        _State.installed = True
        for sig in signals:
            # A signal the parent set to be ignored stays ignored, as Python itself leaves
            # it (a shell script's background job does not stop on the terminal's Ctrl-C).
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, _handle)
    return previous


def restore(previous: dict):
    """Put back the handlers `install` replaced."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    if _in_main_thread():
        _State.installed = False
        if _State.watchdog is not None:
            _State.watchdog.cancel()


def received():
    """The signal number this command received (or a stop notice recorded with
    `note`), or None."""
    return _State.received


def check():
    """A safe point: raises Interrupted if the command line's handlers recorded a signal,
    except inside the training loop (which polls `received()` and saves first). Without
    them (train() called from Python) a signal is only ever recorded inside the loop."""
    if _State.received is not None and not _State.deferring and _State.installed:
        raise Interrupted(_State.received)


def note(signum: int):
    """Records a stop decided elsewhere (JAX's multi-process preemption notice) as if
    `signum` had been received."""
    _State.received = signum


def reset():
    _State.received = None
    if _State.watchdog is not None:
        _State.watchdog.cancel()
        _State.watchdog = None


@contextlib.contextmanager
def deferred(enabled: bool = True):
    """Inside: `check()` does nothing; the training loop polls `received()` between steps.

    Under the command line, a signal received before it (and not yet acted on) stays
    received: the loop stops after its first step. Called from Python (train() without
    the command line) it starts with nothing received, installs the handlers itself and
    puts back whatever was there before on exit. `enabled=False` (several
    processes, which must agree on the step to save at: JAX's preemption sync does that
    for SIGTERM) changes nothing.
    """
    if not enabled:
        yield
        return
    previous = {}
    if _in_main_thread() and not _State.installed:
        reset()
        previous = {sig: signal.signal(sig, _handle) for sig in SIGNALS}
    _State.deferring += 1
    if _State.watchdog is not None:
        _State.watchdog.cancel()  # the loop saves and stops: no hard exit
    try:
        yield
    finally:
        _State.deferring -= 1
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if _State.received is not None and not _State.deferring and _State.installed:
            _start_watchdog(_State.received)


def _exit_when_orphaned(parent: int, every_s: float = 1.0):
    """Exits this worker once its parent is gone: its parent pid changes (to init or a
    subreaper) when the parent dies, however it died."""
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(0)


def _init_worker(parent: int, *_):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.getppid() != parent:  # killed while this worker was still starting
        os._exit(0)
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True,
                     name='exit-when-orphaned').start()


def worker_initializer():
    """The initializer of input, statistics and tiling worker processes started by this
    process: they ignore SIGINT and SIGTERM (the terminal and schedulers signal the whole
    process group; the main process decides when to stop and closes them), and exit by
    themselves when this process is gone (`kill -9`), even if it died while they started.
    A partial of a module function: it pickles into spawned workers."""
    return functools.partial(_init_worker, os.getpid())
