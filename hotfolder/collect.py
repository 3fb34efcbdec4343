"""Dynamic batching: block for the first item, then fill up to ``max_size`` or ``max_wait``.

A pure function of a queue and a monotonic clock (LitServe's ``collate_requests``, without its
busy polling): the only waits are blocking ``get`` calls with a timeout.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Stop:
    """Sentinel put on a queue to tell its consumer to finish."""


STOP = Stop()


def collect(
    source: queue.Queue[T | Stop],
    max_size: int,
    max_wait: float,
    first_timeout: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[list[T], bool]:
    """(batch, stopped). Waits up to ``first_timeout`` (None: forever) for a first item, then at
    most ``max_wait`` seconds more for the batch to fill. Items already queued are always taken,
    even after the deadline. ``stopped`` is True when the STOP sentinel was met."""
    try:
        first = source.get(timeout=first_timeout)
    except queue.Empty:
        return [], False
    if isinstance(first, Stop):
        return [], True
    batch: list[T] = [first]
    deadline = clock() + max_wait
    while len(batch) < max_size:
        remaining = deadline - clock()
        try:
            item = source.get(timeout=remaining) if remaining > 0 else source.get_nowait()
        except queue.Empty:
            break
        if isinstance(item, Stop):
            return batch, True
        batch.append(item)
    return batch, False
