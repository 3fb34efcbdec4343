"""The progress display: a steady rate and time left when files finish in batches."""

from __future__ import annotations

import io
import logging

import pytest

from hotfolder.progress import Progress, choose_mode, format_duration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_time_left_is_steady_when_files_finish_in_batches() -> None:
    clock = Clock()
    progress = Progress(total=96, clock=clock)
    clock.now += 9.0  # the first batch carries the model's first call
    progress.advance(16)
    assert progress.rate() is None  # nothing to measure a rate on yet
    lefts = []
    for _ in range(4):  # then a batch of 16 every 4 s: 4 img/s
        clock.now += 2.0
        lefts.append(progress.line())  # between batches as well as right after one
        clock.now += 2.0
        progress.advance(16)
        lefts.append(progress.line())
    assert progress.rate() == pytest.approx(4.0)
    assert lefts[-1] == "progress: 80/96 files, 4.00 img/s, 0:04 left"
    # Right after each batch the time left is exact, never the minutes a burst rate would say.
    assert lefts[1::2] == [
        f"progress: {done}/96 files, 4.00 img/s, 0:{left:02d} left"
        for done, left in ((32, 16), (48, 12), (64, 8), (80, 4))
    ]


def test_the_total_grows_as_files_are_found() -> None:
    progress = Progress(clock=Clock())
    progress.grow(2)
    progress.advance()
    progress.grow()
    assert (progress.done, progress.total) == (1, 3)
    progress.advance(3)  # a file found twice or adopted from a stopped daemon: never above 100 %
    assert (progress.done, progress.total) == (4, 4)


def test_bar_is_drawn_on_its_line_and_ended(caplog: pytest.LogCaptureFixture) -> None:
    clock, stream = Clock(), io.StringIO()
    progress = Progress(total=2, mode="bar", label="matte", stream=stream, clock=clock)
    clock.now += 1
    progress.advance()
    clock.now += 1
    progress.advance()
    progress.close()
    assert stream.getvalue().endswith(
        "\rmatte: 2/2 files, 1.00 img/s, done in 0:02\n".replace("\r", "\r\x1b[2K")
    )
    assert not caplog.records  # a bar, not log lines


def test_log_mode_writes_a_line_at_most_every_few_seconds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    progress = Progress(total=100, mode="log", clock=clock)
    with caplog.at_level(logging.INFO, logger="hotfolder"):
        for _ in range(100):
            clock.now += 0.5
            progress.advance()
    lines = [r.getMessage() for r in caplog.records]
    assert 10 <= len(lines) <= 12  # 50 s of work: one line per 5 s, and the last
    assert lines[-1].startswith("progress: 100/100 files")


def test_quiet_turns_it_off_and_a_pipe_gets_log_lines() -> None:
    assert choose_mode(True) == "off"
    assert choose_mode(False, stream=io.StringIO()) == "log"
    assert format_duration(3725) == "1:02:05"


def test_files_of_one_batch_finishing_one_by_one_give_no_burst_rate() -> None:
    # matte and the daemon report each file as its outputs are written: a batch's files
    # finish milliseconds apart, which is no rate at all (it read 3452 img/s).
    clock = Clock()
    progress = Progress(total=8, label="matte", clock=clock)
    clock.now += 9.0
    for _ in range(4):
        progress.advance()
        clock.now += 0.01
    assert progress.line() == "matte: 4/8 files"
    clock.now += 3.96  # the next batch, 4 s after the first
    for _ in range(4):
        progress.advance()
        clock.now += 0.01
    assert progress.rate() == pytest.approx(1.0, rel=0.02)
    assert progress.line() == "matte: 8/8 files, 0.99 img/s, done in 0:13"
