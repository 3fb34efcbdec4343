"""Progress of a run over many files (``matte``, ``run --once``): done/total, images per second
and the time left.

On a terminal it is a bar on stderr; otherwise (a log file, a cron job, systemd) one log line
every few seconds, so a long run still says how far it is. ``--quiet`` turns it off.

The rate is the average since the first batch finished, not a recent window: files finish in
batches, and a windowed rate swings with every batch (an ETA of ten minutes for a twenty-second
job, after the first batch). Model loading and warm-up happen before the clock starts.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

log = logging.getLogger("hotfolder")

LOG_INTERVAL = 5.0  # seconds between progress log lines without a terminal
DRAW_INTERVAL = 0.2  # seconds between redraws of the bar
# Files reported within this many seconds of the first one belong to the first batch: callers
# report each file as its outputs are written, so one batch arrives as a burst of single files.
FIRST_BATCH_SPAN = 1.0


def choose_mode(quiet: bool, log_format: str = "text", stream: TextIO | None = None) -> str:
    """``off`` with --quiet, ``bar`` on a terminal (``stream``, default standard error), else
    ``log``. With JSON logs always ``log``: a bar between them would break one JSON object per
    line on a terminal too."""
    if quiet:
        return "off"
    # sys.stderr is None in a process started with standard error closed (`2>&-`).
    shown: TextIO | None = sys.stderr if stream is None else stream
    return "bar" if shown is not None and shown.isatty() and log_format == "text" else "log"


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Counts finished files against a total that may grow (a daemon run ``--once`` finds files
    as it lists the inboxes). Thread-safe: stages report from their own threads.

    ``mode``: ``bar``, ``log`` or ``off``; ``clock`` returns seconds (monotonic)."""

    def __init__(
        self,
        total: int = 0,
        mode: str = "off",
        label: str = "progress",
        stream: TextIO = sys.stderr,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.done = 0
        self.mode = mode
        self.label = label
        self.stream = stream
        self._clock = clock
        self._lock = threading.Lock()
        self._started = self._clock()
        self._first_done: float | None = None
        self._done_at_first = 0
        self._last_shown = float("-inf")
        self._drawn = False

    def grow(self, files: int = 1) -> None:
        with self._lock:
            self.total += files

    def advance(self, files: int = 1) -> None:
        with self._lock:
            now = self._clock()
            if self._first_done is None:
                # The first batch includes the model's first call: the rate starts after it.
                self._first_done, self._done_at_first = now, files
            elif now - self._first_done < FIRST_BATCH_SPAN:
                self._done_at_first += files
            self.done += files
            self.total = max(self.total, self.done)
            interval = DRAW_INTERVAL if self.mode == "bar" else LOG_INTERVAL
            if now - self._last_shown >= interval or self.done == self.total:
                self._last_shown = now
                self._show(now)

    def rate(self, now: float | None = None) -> float | None:
        """Files per second since the first finished, or None before two points exist."""
        now = self._clock() if now is None else now
        if self._first_done is None or now <= self._first_done:
            return None
        return (self.done - self._done_at_first) / (now - self._first_done)

    def line(self, now: float | None = None) -> str:
        """``label: 40/100 files, 4.1 img/s, 0:15 left`` (rate and time left once known)."""
        now = self._clock() if now is None else now
        parts = [f"{self.label}: {self.done}/{self.total} files"]
        rate = self.rate(now)
        if rate:
            parts.append(f"{rate:.2f} img/s")
            if self.done < self.total:
                parts.append(f"{format_duration((self.total - self.done) / rate)} left")
        if self.done >= self.total and self.total:
            parts.append(f"done in {format_duration(now - self._started)}")
        return ", ".join(parts)

    def _show(self, now: float) -> None:
        if self.mode == "bar":
            self.stream.write("\r\x1b[2K" + self.line(now))
            self.stream.flush()
            self._drawn = True
        elif self.mode == "log":
            log.info("%s", self.line(now))

    def clear(self) -> None:
        """Take the bar off its line, so a log record can be printed (see :class:`BarSafe`)."""
        if self._drawn:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()

    def close(self) -> None:
        """End the bar's line (a terminal) so what follows starts on a line of its own."""
        with self._lock:
            if self._drawn:
                self.stream.write("\r\x1b[2K" + self.line() + "\n")
                self.stream.flush()
                self._drawn = False


class BarSafe(logging.Filter):
    """A filter for the stderr log handler: clears the bar before a record is written, so log
    lines and the bar never share a line (the next file to finish draws the bar again)."""

    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        self.progress.clear()
        return True
