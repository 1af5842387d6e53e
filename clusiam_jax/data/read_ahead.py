"""Threads that read ahead and never hold up a process's exit. concurrent.futures' pool joins
its threads, after their whole queue, when the interpreter exits: a bucket that stopped
answering would keep a finished run (or a grain worker told to stop) waiting out every
queued read's retries. These are daemons, end when idle, and drop their queue on shutdown."""
import queue
import threading
from typing import List

# Seconds a thread waits for work before it ends (a source left unused holds none).
IDLE_SECONDS = 10.0


class DaemonPool:
    """Up to `threads` daemon threads running submitted calls in order, started on demand and
    ended after IDLE_SECONDS without work; shutdown(wait=False) drops what is queued and
    never waits for a call under way (a bucket read may take its retries' time)."""

    def __init__(self, threads: int, name: str):
        self._max, self._name = int(threads), name
        self._queue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: List[threading.Thread] = []
        self._closed = False

    def submit(self, fn, *args) -> bool:
        """Queues fn(*args); False once shut down (not run)."""
        with self._lock:
            if self._closed:
                return False
            self._queue.put((fn, args))
            self._threads = [t for t in self._threads if t.is_alive()]
            if len(self._threads) < self._max:
                thread = threading.Thread(target=self._run, name=f'{self._name}-{id(self)}',
                                          daemon=True)
                self._threads.append(thread)
                thread.start()
        return True

    def _run(self):
        while True:
            try:
                item = self._queue.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:   # a call queued meanwhile is left to a live thread
                    if self._queue.empty():
                        self._threads.remove(threading.current_thread())
                        return
                continue
            if item is None:
                return
            fn, args = item
            fn(*args)

    def shutdown(self, wait: bool = False) -> int:
        """Stops the threads (after the calls queued when `wait`, else after their current
        one, unwaited); returns how many queued calls were dropped."""
        dropped = 0
        with self._lock:
            self._closed = True
            if not wait:
                while True:
                    try:
                        self._queue.get_nowait()
                    except queue.Empty:
                        break
                    dropped += 1
            threads = list(self._threads)
            for _ in threads:
                self._queue.put(None)
        if wait:
            for thread in threads:
                thread.join()
        return dropped
