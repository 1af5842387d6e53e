"""Counters of what a process asked of the buckets (storage.py's reads), summed over grain
workers and shown per log window and per epoch (docs/storage.md, Telemetry)."""
import math
import threading
from typing import List


class Telemetry:
    """What this process asked of the buckets since the last `take()` (the loop's log window).
    Latency is per read call (one batch of concurrent ranges counts once); `retries` and
    `errors` are this layer's, after the client library's own retries. Latencies are kept as
    a sum and a fixed log-spaced histogram only (a process that never takes them, export or
    tiling, stays small), so that counts from several processes add up (`take_counts`,
    `summary`). A slide reader notes the slides it
    opens and its whole-slide cache's hits and misses (`note`)."""
    # Histogram: bucket i holds latencies up to _HIST_FIRST_S * _HIST_RATIO ** i (the last:
    # any longer), so a p99 read from it is at most 19% above the true one.
    _HIST_FIRST_S, _HIST_RATIO, _HIST_BUCKETS = 1e-4, 2 ** 0.25, 84
    COUNTERS = ('requests', 'bytes', 'retries', 'errors', 'slides_opened', 'cache_hits',
                'cache_misses', 'calls', 'latency_us')
    SIZE = len(COUNTERS) + _HIST_BUCKETS   # of take_counts()

    def __init__(self):
        self._lock = threading.Lock()
        self._reset()

    def _reset(self):
        self.requests = self.bytes = self.retries = self.errors = 0
        self.slides_opened = self.cache_hits = self.cache_misses = 0
        self.calls, self.latency_us = 0, 0
        self._histogram = [0] * self._HIST_BUCKETS

    def add(self, requests: int, nbytes: int, seconds: float, retries: int = 0, errors: int = 0):
        with self._lock:
            self.requests += requests
            self.bytes += nbytes
            self.retries += retries
            self.errors += errors
            if requests:
                self.calls += 1
                self.latency_us += round(1e6 * seconds)
                self._histogram[self._bucket(seconds)] += 1

    def note(self, slides_opened: int = 0, cache_hits: int = 0, cache_misses: int = 0):
        with self._lock:
            self.slides_opened += slides_opened
            self.cache_hits += cache_hits
            self.cache_misses += cache_misses

    @classmethod
    def _bucket(cls, seconds: float) -> int:
        if seconds <= cls._HIST_FIRST_S:
            return 0
        i = math.ceil(math.log(seconds / cls._HIST_FIRST_S, cls._HIST_RATIO) - 1e-9)
        return min(i, cls._HIST_BUCKETS - 1)

    def take(self) -> dict:
        """The counters since the last take, reset (p99: the upper edge of its bucket)."""
        return self.summary(self.take_counts())

    def take_counts(self) -> List[int]:
        """The counters as integers (COUNTERS, then the latency histogram), reset: summed
        over elements, workers and processes, `summary` turns them into `take()`'s dict."""
        with self._lock:
            out = [self.requests, self.bytes, self.retries, self.errors, self.slides_opened,
                   self.cache_hits, self.cache_misses, self.calls, self.latency_us,
                   *self._histogram]
            self._reset()
        return out

    @classmethod
    def summary(cls, counts, slides: bool = False) -> dict:
        """`take()`'s dict from summed `take_counts()` (p99: the upper edge of its bucket);
        with `slides`, also the slides opened and the slide cache's hit rate (None: unused)."""
        counts = [int(c) for c in counts]
        (requests, nbytes, retries, errors, opened, hits, misses, calls,
         latency_us) = counts[:len(cls.COUNTERS)]
        histogram = counts[len(cls.COUNTERS):]
        p99 = 0.0
        if calls:
            rank, seen = math.ceil(0.99 * calls), 0
            for i, n in enumerate(histogram):
                seen += n
                if seen >= rank:
                    p99 = 1e3 * cls._HIST_FIRST_S * cls._HIST_RATIO ** i
                    break
        out = {'requests': requests, 'bytes': nbytes, 'retries': retries, 'errors': errors,
               'latency_mean_ms': latency_us / 1e3 / calls if calls else 0.0,
               'latency_p99_ms': p99}
        if slides:
            out.update(slides_opened=opened, cache_hit_rate=hits / (hits + misses)
                       if hits + misses else None)
        return out


telemetry = Telemetry()
