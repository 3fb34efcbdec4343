"""Noticing files in an inbox, and deciding when each one is completely written.

Events are hints, the folder listing is the truth: watchdog reports nothing for files present at
start, drops events when inotify's queue overflows, and sees nothing another machine writes to a
network share. So every inbox is also scanned at start and periodically. Events only make a file
known sooner; it is ready once its size *and* mtime have not changed for ``settle_ms`` (Windows
Explorer sets the final size at the start of an SMB copy, so size alone lies).

A writer may also pause for longer than ``settle_ms``. Two more signals cover that:

- inotify reports opens and closes (not who opened, nor whether for writing). A file opened more
  often than closed since it was noticed is held: taken once closed and settled, or, should a
  close never be seen (a reader that keeps it open, events lost), once it has been unchanged for
  the inbox's ``incomplete_grace_ms``. A writer that opened the file before the daemon started,
  or one on another machine (polling), is not seen this way.
- The service checks what it claimed (imaging.looks_incomplete). A file that looks cut short and
  has not changed since the claim is put back and held here, unchanged, for
  ``incomplete_grace_ms`` before it is handed out once more (to be refused then); any change
  makes it an ordinary file again.

A backlog of 100 000 files must not slow the daemon down, so a step's work is that of what
happened, never a look at every file waiting:

- a tracked file is looked at (``lstat``) when its settle or grace time is up (a heap of due
  times), when a hint names it, and at every step while it is changing or open in a process;
- at most ``limit`` files (``TRACKED_LIMIT``) are tracked, the ready ones not claimed yet
  included; the rest stay in the inbox, untracked and costing nothing, until a scan reaches
  them (hotfolder.scan: a pass pauses while there is no room, and folders whose mtime did not
  change are not listed again). Memory: about 0.3 KB a tracked file.

Files waiting are counted all the same, tracked or not (the backlog gauges): every
``scan_interval`` a count of the tree (a pass of hotfolder.scan that only counts, and lists only
the folders whose mtime changed), plus the files events made known since, minus those handed
out and taken since. Exact when nothing changes while a count is in progress; a file removed
from the inbox by hand, or one that arrives while its folder is being counted, is off by one
until the next count.

Watchdog callbacks run on its one dispatcher thread and only enqueue; all work is in ``step()``.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from hotfolder import names
from hotfolder.config import InboxConfig
from hotfolder.scan import TreeScan, is_ignored, parent

__all__ = ["CHANGED", "CLOSED", "OPENED", "RESCAN", "InboxWatcher", "Ready", "is_ignored"]

log = logging.getLogger(__name__)

# Hints, as (kind, path): list the whole inbox now (a folder appeared or moved in); a file
# changed or appeared; a file was opened; a file was closed (after writing or not).
RESCAN, CHANGED, OPENED, CLOSED = "rescan", "changed", "opened", "closed"
# watchdog's inotify emitter reports IN_OPEN (for reading or writing alike), IN_CLOSE_WRITE and
# IN_CLOSE_NOWRITE as these; every other event of a file is a change.
EVENT_HINTS = {"opened": OPENED, "closed": CLOSED, "closed_no_write": CLOSED}
OPEN_COUNT = {OPENED: 1, CLOSED: -1}  # what a hint does to a file's count of opens


class _HarmlessWatchdogNoise(logging.Filter):
    """Logs two messages of watchdog's inotify observer at DEBUG, where they belong:

    - ERROR "queue_events() called when the thread is inactive": an event that reaches the
      emitter while the observer stops is dropped. It happens at every stop within half a second
      of a file leaving the inbox (watchdog holds such a move that long, to pair it with a move
      in). Nothing is lost: the folder listing is the truth, and every start scans it.
    - RuntimeWarning "Callback with id ... already exists": a folder created under the watch
      was seen both by watchdog's walk and by its own creation event, and got the same callback
      on the same watch twice, which changes nothing.
    """

    MESSAGES = ("called when the thread is inactive", "already exists for watch")

    def filter(self, record: logging.LogRecord) -> bool:
        if any(text in record.getMessage() for text in self.MESSAGES):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_NOISE = _HarmlessWatchdogNoise()


def _quiet_harmless_watchdog_noise() -> None:
    # py.warnings: where logging.captureWarnings sends warnings (the CLI turns it on).
    for name in ("watchdog.observers.inotify", "py.warnings"):
        logging.getLogger(name).addFilter(_NOISE)  # once: addFilter skips a filter it has


# Files tracked at most (settling, or ready and not claimed yet), so that memory and the work of a
# step stay bounded whatever the backlog; the rest wait in the inbox for a later scan. About
# 0.3 KB each (bench/backlog.py --micro). Enough for thousands of files a second to settle at
# once on a fast GPU.
TRACKED_LIMIT = 10_000


@dataclass(slots=True)
class Pending:
    """A file seen but not yet ready: what it looked like last, and since when."""

    size: int
    mtime_ns: int
    unchanged_since: float  # on the step clock (monotonic)
    detected_at: float  # wall-clock time, for the journal and latency
    open: int = 0  # opens seen minus closes seen: a process may still be writing
    due: float = math.inf  # when it is to be looked at next (step clock); inf: not scheduled


@dataclass(frozen=True)
class Unfinished:
    """A claimed file that looked cut short, put back as it was then, and since when."""

    size: int
    mtime_ns: int
    since: float  # on the step clock


@dataclass(frozen=True)
class Ready:
    relative: str
    detected_at: float


class _Hints(FileSystemEventHandler):
    """Turns watchdog events into (kind, path) hints on a queue; nothing else."""

    def __init__(self, root: Path, hints: queue.SimpleQueue[tuple[str, str]]) -> None:
        self.root = root
        self.hints = hints

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, DirCreatedEvent | DirMovedEvent):
            self.hints.put((RESCAN, ""))
            return
        if event.is_directory or event.event_type == "deleted":
            return
        kind = EVENT_HINTS.get(event.event_type, CHANGED)
        for path in (event.src_path, getattr(event, "dest_path", "")):
            if path:
                self.hints.put((kind, os.fsdecode(path)))


class InboxWatcher:
    """Finds the ready files of one inbox. ``step(now)`` is the whole loop body."""

    def __init__(
        self,
        config: InboxConfig,
        scan_interval: float,
        observe: bool = True,
        on_detected: Callable[[bool], None] = lambda by_scan: None,
        on_restart: Callable[[], None] = lambda: None,
        clock_start: float = 0.0,
        limit: int = TRACKED_LIMIT,
    ) -> None:
        self.config = config
        self.root = config.path
        self.settle = config.settle_ms / 1000
        self.grace = config.incomplete_grace_ms / 1000
        self.scan_interval = scan_interval
        self.observe = observe
        self.on_detected = on_detected
        self.on_restart = on_restart
        self.limit = limit
        self.pending: dict[str, Pending] = {}
        self.handed_out: set[str] = set()  # ready, until the service says it tried to claim it
        # (due, key) of the pending files: a step looks only at those whose time has come...
        self.schedule: list[tuple[float, str]] = []
        # ...and at those something happens to: seen changing at their last look, or open in
        # a process (a writer that pauses, then writes again, is seen at once).
        self.close_watch: set[str] = set()
        # Opens minus closes of files not tracked for want of room, so that a scan that tracks
        # one later knows it is open. Files open at once are few; counts that stick (closes
        # lost) go once ``limit`` files are counted, oldest first.
        self.open_untracked: dict[str, int] = {}
        self.tree = TreeScan(self.root, config.recursive, self._warn_once)
        self.rescan = False  # a folder appeared: a pass as soon as the one in progress ends
        # Counting the files waiting, tracked or not: the last count of the tree, and what
        # events made known and the service took since that count began.
        self.census = TreeScan(self.root, config.recursive, self._warn_once, collect=False)
        self.next_census = clock_start
        self.census_began = 0.0  # wall-clock time
        self.arrived = self.taken = 0
        self.backlog_since: float | None = None  # wall-clock time the count first exceeded
        # the tracked files, while it still does
        self.overflowed = False  # a file was left untracked for want of room: a pass once room
        # Put back for looking cut short; written by the decode threads, hence the lock.
        self.unfinished: dict[str, Unfinished] = {}
        self.lock = threading.Lock()
        self.hints: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self.next_scan = clock_start  # scan at the first step
        self.observer: BaseObserver | None = None
        self.root_inode = 0
        self.warned: set[tuple[Path, str]] = set()

    def start(self) -> None:
        """Watch the inbox folder, which must exist: it is never created here, since a share
        that dropped leaves a bare mountpoint where it would be (the config check creates the
        folders once, at start). Raises FileNotFoundError if it is missing."""
        self.root_inode = self.root.stat().st_ino
        if self.observe:
            _quiet_harmless_watchdog_noise()
            observer_class = PollingObserver if self.config.polling else Observer
            observer = observer_class(timeout=0.5)
            observer.schedule(
                _Hints(self.root, self.hints), str(self.root), recursive=self.config.recursive
            )
            observer.start()
            self.observer = observer
            how = "polling" if self.config.polling else "inotify"
            log.info("inbox %s: watching %s with %s", self.config.name, self.root, how)

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=5)
            self.observer = None

    def healthy(self) -> bool:
        """The observer's emitter threads are alive and still watch the folder we mean.
        (watchdog's own ``is_alive()`` stays true after an emitter died.)"""
        if not self.observe:
            return True
        if self.observer is None or not self.observer.is_alive():
            return False
        emitters = list(self.observer.emitters)
        if not emitters or not all(e.is_alive() for e in emitters):
            return False
        try:
            return self.root.stat().st_ino == self.root_inode
        except FileNotFoundError:
            return False

    def oldest_detected(self) -> float | None:
        """Wall-clock detection time of the oldest file still waiting, if any: a file not
        tracked yet has waited since the first count that found more files than were tracked."""
        oldest = min((p.detected_at for p in self.pending.values()), default=None)
        if self.backlog_since is None or (oldest is not None and oldest < self.backlog_since):
            return oldest
        return self.backlog_since

    def waiting_files(self) -> int:
        """Files in the inbox not handed out and taken yet, tracked or not (see the module
        docstring for how exact)."""
        census = self.census
        counted = census.found if census.last_found is None else census.last_found
        tracked = len(self.pending) + len(self.handed_out)
        return max(counted + self.arrived - self.taken, tracked)

    def restart_observer(self) -> None:
        """Watch the folder again once it is back; until then (a share away, the folder
        deleted) wait, and let the intake's pause keep files from being taken."""
        if not self.root.is_dir():
            self._warn_once(self.root, "the inbox folder is gone; waiting for it to come back")
            return
        log.warning(
            "inbox %s: watcher stopped (folder gone or replaced); restarting it", self.config.name
        )
        self.stop()
        self.on_restart()
        try:
            self.start()
        except OSError as exc:  # gone again in between
            self._warn_once(self.root, f"cannot watch the inbox folder ({exc.strerror})")
            return
        self.warned.discard((self.root, "the inbox folder is gone; waiting for it to come back"))
        self.tree.forget()  # another folder may be there now: its mtimes say nothing
        self.census.forget()
        self.hints.put((RESCAN, ""))

    def step(self, now: float) -> list[Ready]:
        """Take hints, go on with the scan, and return the files that have settled. The work
        is that of what happened: hints, files whose time has come or that are changing, and
        at most ``SCAN_BUDGET`` entries of a scan; never one look at every file waiting."""
        if self.observe and not self.healthy():
            self.restart_observer()
            if not self.healthy():
                # The folder is away (moved aside, a share that dropped): every file would
                # look gone and be forgotten, with the rest of a listing, until the next
                # full listing. Nothing is looked at until it is back.
                return []
        look: dict[str, None] = dict.fromkeys(self._take_hints(now))
        self._count(now)
        tree = self.tree
        if not tree.active and self._scan_due(now):
            self.next_scan = now + self.scan_interval
            self.rescan = self.overflowed = False
            tree.start()
        tree.step(now, lambda key: self._offer(key, now, by_scan=True))
        while self.schedule and self.schedule[0][0] <= now:
            due, key = heapq.heappop(self.schedule)
            seen = self.pending.get(key)
            if seen is not None and seen.due == due:
                seen.due = math.inf
                look[key] = None
        look.update(dict.fromkeys(self.close_watch))
        return [ready for key in look if (ready := self._look(key, now)) is not None]

    def _count(self, now: float) -> None:
        """Go on with the count of the files waiting; a new one every ``scan_interval``."""
        census = self.census
        if not census.active and now >= self.next_census:
            self.next_census = now + self.scan_interval
            self.census_began, self.arrived, self.taken = time.time(), 0, 0
            census.start()
        if not census.active:
            return
        census.step(now, lambda key: True)
        if census.active:
            return
        if census.found > len(self.pending) + len(self.handed_out):
            if self.backlog_since is None:
                self.backlog_since = self.census_began
        else:
            self.backlog_since = None

    def _scan_due(self, now: float) -> bool:
        room = len(self.pending) + len(self.handed_out) < self.limit
        return now >= self.next_scan or self.rescan or (self.overflowed and room)

    def _take_hints(self, now: float) -> list[str]:
        """Apply the hints that came since the last step; returns the tracked files they
        concern, to be looked at now."""
        touched: list[str] = []
        while True:
            try:
                kind, path = self.hints.get_nowait()
            except queue.Empty:
                return touched
            if kind == RESCAN:
                self.rescan = True
                continue
            key = self._key(path)
            if key is None:
                continue
            known = key in self.pending
            if not known and not self._offer(key, now, by_scan=False):
                self.overflowed = True  # no room: a scan finds it later
                self.tree.dirty(parent(key))
                self._count_open_untracked(key, kind)
                continue
            seen = self.pending.get(key)
            if seen is None:
                continue
            # Counted, not paired: events name no process, and inotify merges identical
            # events that follow each other. A count that sticks above zero ends at the grace
            # time.
            seen.open = max(seen.open + OPEN_COUNT.get(kind, 0), 0)
            if seen.open:
                self.close_watch.add(key)
            if known:  # one just offered was looked at already
                touched.append(key)

    def _count_open_untracked(self, key: str, kind: str) -> None:
        count = max(self.open_untracked.pop(key, 0) + OPEN_COUNT.get(kind, 0), 0)
        if count:
            self.open_untracked[key] = count
            if len(self.open_untracked) > self.limit:
                del self.open_untracked[next(iter(self.open_untracked))]

    def _key(self, path: str) -> str | None:
        """The key of a file path (POSIX, relative to the inbox), or None if it is not one to
        take: outside the inbox, hidden, temporary, or below a subfolder of a flat inbox."""
        try:
            relative = Path(path).relative_to(self.root)
        except ValueError:
            return None
        parts = relative.parts
        if not parts or any(is_ignored(part) for part in parts):
            return None
        if not self.config.recursive and len(parts) > 1:
            return None
        return relative.as_posix()

    def _offer(self, key: str, now: float, by_scan: bool) -> bool:
        """Start following a file, if there is room; False if there is none."""
        if key in self.pending or key in self.handed_out:
            return True
        if len(self.pending) + len(self.handed_out) >= self.limit:
            return False
        info = self._lstat(str(self.root / key))
        if info is None or stat.S_ISDIR(info.st_mode):
            return True
        self.on_detected(by_scan)
        if not by_scan:
            self.arrived += 1
        seen = self.pending[key] = Pending(info.st_size, info.st_mtime_ns, now, time.time())
        seen.open = self.open_untracked.pop(key, 0)
        if seen.open:
            self.close_watch.add(key)
        self._schedule(key, seen, now + self.settle)
        return True

    def _schedule(self, key: str, seen: Pending, due: float) -> None:
        if due != seen.due:
            seen.due = due
            heapq.heappush(self.schedule, (due, key))
        if len(self.schedule) > 2 * len(self.pending) + 64:  # entries of times superseded
            self.schedule = [(p.due, k) for k, p in self.pending.items() if p.due != math.inf]
            heapq.heapify(self.schedule)

    def _look(self, key: str, now: float) -> Ready | None:
        """Look at one tracked file: ready, or scheduled for its next look."""
        seen = self.pending.get(key)
        if seen is None:
            self.close_watch.discard(key)
            return None
        info = self._lstat(str(self.root / key))
        if info is None:
            del self.pending[key]
            self.close_watch.discard(key)
            self._forget_unfinished(key)
            return None
        if (info.st_size, info.st_mtime_ns) != (seen.size, seen.mtime_ns):
            seen.size, seen.mtime_ns, seen.unchanged_since = info.st_size, info.st_mtime_ns, now
            self.close_watch.add(key)
            self._schedule(key, seen, now + self.settle)
            return None
        if seen.open:
            self.close_watch.add(key)
        else:
            self.close_watch.discard(key)
        settled_at = seen.unchanged_since + self.settle
        if now < settled_at:
            self._schedule(key, seen, settled_at)
            return None
        held_until = self._held_until(key, seen, now)
        if held_until is not None:
            self._schedule(key, seen, held_until)
            return None
        del self.pending[key]
        self.close_watch.discard(key)
        self.handed_out.add(key)
        return Ready(key, seen.detected_at)

    def _held_until(self, key: str, seen: Pending, now: float) -> float | None:
        """A settled file that may still be arriving: open in a process, or put back for
        looking cut short; either until it has been unchanged for the grace time. Returns
        when it is to be looked at again, or None if it is not held."""
        if seen.open:
            until = seen.unchanged_since + self.grace
            if now < until:
                return until
            log.warning("inbox %s: %s is still open in a process but unchanged for %.0f s; "
                        "taking it", self.config.name, key, now - seen.unchanged_since)  # fmt: skip
            seen.open = 0
        with self.lock:
            put_back = self.unfinished.get(key)
            if put_back is None:
                return None
            if (seen.size, seen.mtime_ns) != (put_back.size, put_back.mtime_ns):
                del self.unfinished[key]  # written to since: an ordinary file again
                return None
            until = put_back.since + self.grace
            return until if now < until else None

    def still_arriving(self, relative: str, size: int, mtime_ns: int, now: float) -> bool:
        """A claimed file looks cut short (empty, truncated) and has not changed since the
        claim. True: put it back to wait for its writer (the first time, or while the grace
        time runs); False: it has looked so, unchanged, for ``incomplete_grace_ms`` and is to
        be refused. Called from the decode threads."""
        if self.grace <= 0:
            return False
        with self.lock:
            put_back = self.unfinished.get(relative)
            if put_back is None or (put_back.size, put_back.mtime_ns) != (size, mtime_ns):
                self.unfinished[relative] = Unfinished(size, mtime_ns, now)
                return True
            if now - put_back.since < self.grace:
                return True
            del self.unfinished[relative]
            return False

    def waiting(self) -> bool:
        """Files seen and not handed out yet, a scan not finished, files left for want of
        room, and files put back for looking cut short that no scan has found again yet."""
        if self.pending or self.tree.active or self.rescan or self.overflowed:
            return True
        with self.lock:
            put_back = list(self.unfinished)
        return any(self._lstat(str(self.root / k)) for k in put_back)

    def _forget_unfinished(self, key: str) -> None:
        with self.lock:
            self.unfinished.pop(key, None)

    def _lstat(self, path: str) -> os.stat_result | None:
        try:
            return os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:  # a folder without search permission, a path too long
            self._warn_once(Path(path), f"cannot look at this file ({exc.strerror})")
            return None

    def _warn_once(self, path: Path, problem: str) -> None:
        """One log line per path and problem, not one per scan."""
        if (path, problem) not in self.warned:
            self.warned.add((path, problem))
            log.warning("inbox %s: %s: %s", self.config.name, names.escape(str(path)), problem)

    def done(self, relative: str) -> None:
        """The service tried to claim a ready file: a new file of that name counts as new.
        The file may still be there (it could not be moved): its folder is listed again."""
        self.handed_out.discard(relative)
        self.taken += 1
        self.tree.dirty(parent(relative))
