"""Host batches -> global jax.Arrays, with a small device-side prefetch queue.

JAX is imported inside the functions so that importing ``clusiam_jax.data``
(which every grain worker process does to unpickle its transforms) stays free
of JAX.
"""
import collections
from typing import Iterator, Mapping


def to_device(batch: Mapping, sharding):
    """Each process's local rows -> global arrays sharded along the batch axis.

    ``sharding`` is one ``jax.sharding.Sharding`` for every entry, or a mapping
    from entry name to sharding.
    """
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    out = {}
    for name, value in batch.items():
        s = sharding[name] if isinstance(sharding, Mapping) else sharding
        out[name] = jax.make_array_from_process_local_data(s, np.asarray(value))
    return out


def prefetch_to_device(iterator: Iterator, sharding, size: int = 2, with_state: bool = False):
    """Yields device batches, keeping ``size`` transfers in flight ahead.

    Transfers are asynchronous, so while the train step runs on batch t the
    host-to-device copies of batches t+1 .. t+size proceed. With ``with_state``
    it yields ``(batch, state)`` where ``state`` is ``iterator.get_state()`` taken
    right after that batch was drawn: a checkpoint saved after consuming the batch
    resumes on the next one, however far ahead the prefetch has read.
    """
    queue = collections.deque()
    size = max(1, int(size))
    for batch in iterator:
        item = to_device(batch, sharding)
        queue.append((item, iterator.get_state()) if with_state else item)
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
