"""Host batches -> global jax.Arrays, with a small device-side prefetch queue."""
import collections
from typing import Iterator, Mapping

import jax
import numpy as np


def to_device(batch: Mapping, sharding):
    """Each process's local rows -> global arrays; ``sharding``: one, or one per entry."""
    return {name: jax.make_array_from_process_local_data(
        sharding[name] if isinstance(sharding, Mapping) else sharding, np.asarray(value))
        for name, value in batch.items()}


def prefetch_to_device(iterator: Iterator, sharding, size: int = 2, with_state: bool = False):
    """Device batches ``size`` ahead; ``with_state``: (batch, iterator's state right after it)."""
    queue = collections.deque()
    size = max(1, int(size))
    for batch in iterator:
        item = to_device(batch, sharding)
        queue.append((item, iterator.get_state()) if with_state else item)
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
