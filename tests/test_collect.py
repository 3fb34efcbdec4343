"""Dynamic batching, driven with a fake clock: no sleeps."""

from __future__ import annotations

import queue

from hotfolder.collect import STOP, Stop, collect


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def filled(items: list[object]) -> queue.Queue[object | Stop]:
    q: queue.Queue[object | Stop] = queue.Queue()
    for item in items:
        q.put(item)
    return q


def test_a_backlog_gives_full_batches() -> None:
    q = filled(list(range(40)))
    clock = FakeClock()
    sizes = []
    while not q.empty():
        batch, stopped = collect(q, 16, 0.02, 0, clock)
        assert not stopped
        sizes.append(len(batch))
    assert sizes == [16, 16, 8]


def test_queued_items_are_taken_even_after_the_deadline() -> None:
    q = filled([1, 2, 3])
    clock = FakeClock()
    original_get = q.get

    def get_then_time_passes(*args: object, **kwargs: object) -> object:
        clock.now += 1.0  # the deadline is long gone after the first item
        return original_get(*args, **kwargs)  # type: ignore[arg-type]

    q.get = get_then_time_passes  # type: ignore[method-assign]
    batch, _ = collect(q, 16, 0.02, 0, clock)
    assert batch == [1, 2, 3]


def test_empty_queue_returns_nothing_after_first_timeout() -> None:
    assert collect(filled([]), 16, 0.02, 0.0, FakeClock()) == ([], False)


def test_stop_ends_the_batch_and_says_so() -> None:
    assert collect(filled([1, 2, STOP, 3]), 16, 0.02, 0, FakeClock()) == ([1, 2], True)
    assert collect(filled([STOP]), 16, 0.02, 0, FakeClock()) == ([], True)
