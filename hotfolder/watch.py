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

Watchdog callbacks run on its one dispatcher thread and only enqueue; all work is in ``step()``.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator
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

log = logging.getLogger(__name__)

# Names that are never taken: hidden files, uploads in progress, editor and OS droppings.
IGNORED_NAMES = (
    ".*",
    "*.part",
    "*.partial",
    "*.tmp",
    "*.temp",
    "*.crdownload",
    "*.download",
    "*.!sync",
    "*.rclonetmp",
    "*.filepart",
    "~$*",
    "*.swp",
    "*~",
    "thumbs.db",
    "desktop.ini",
)
# Hints, as (kind, path): list the whole inbox now (a folder appeared or moved in); a file
# changed or appeared; a file was opened; a file was closed (after writing or not).
RESCAN, CHANGED, OPENED, CLOSED = "rescan", "changed", "opened", "closed"
# watchdog's inotify emitter reports IN_OPEN (for reading or writing alike), IN_CLOSE_WRITE and
# IN_CLOSE_NOWRITE as these; every other event of a file is a change.
EVENT_HINTS = {"opened": OPENED, "closed": CLOSED, "closed_no_write": CLOSED}


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


def is_ignored(name: str) -> bool:
    lowered = name.lower()
    return any(fnmatch.fnmatchcase(lowered, pattern) for pattern in IGNORED_NAMES)


@dataclass
class Pending:
    """A file seen but not yet ready: what it looked like last, and since when."""

    size: int
    mtime_ns: int
    unchanged_since: float  # on the step clock (monotonic)
    detected_at: float  # wall-clock time, for the journal and latency
    open: int = 0  # opens seen minus closes seen: a process may still be writing


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
    ) -> None:
        self.config = config
        self.root = config.path
        self.settle = config.settle_ms / 1000
        self.grace = config.incomplete_grace_ms / 1000
        self.scan_interval = scan_interval
        self.observe = observe
        self.on_detected = on_detected
        self.on_restart = on_restart
        self.pending: dict[str, Pending] = {}
        self.handed_out: set[str] = set()  # ready, until the service says it tried to claim it
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
        """Wall-clock detection time of the oldest file still waiting, if any."""
        return min((p.detected_at for p in self.pending.values()), default=None)

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
        self.hints.put((RESCAN, ""))

    def step(self, now: float) -> list[Ready]:
        """Take hints, scan when due, and return the files that have settled."""
        if self.observe and not self.healthy():
            self.restart_observer()
        rescan = now >= self.next_scan
        while True:
            try:
                kind, path = self.hints.get_nowait()
            except queue.Empty:
                break
            if kind == RESCAN:
                rescan = True
            else:
                opens = {OPENED: 1, CLOSED: -1}.get(kind, 0)
                self._note(path, now, by_scan=False, opens=opens)
        if rescan:
            self.next_scan = now + self.scan_interval
            for path in self.scan():
                self._note(path, now, by_scan=True)
        return self._settled(now)

    def scan(self) -> Iterator[str]:
        """Every candidate file under the inbox (hidden and temporary names skipped)."""
        stack = [self.root]
        while stack:
            folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:  # no permission, a path past PATH_MAX: skip it, serve on
                self._warn_once(folder, f"cannot list this folder ({exc.strerror})")
                continue
            for entry in entries:
                if is_ignored(entry.name):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if self.config.recursive:
                        stack.append(Path(entry.path))
                else:
                    yield entry.path

    def _note(self, path: str, now: float, by_scan: bool, opens: int = 0) -> None:
        """Start following a file; ``opens`` is +1 for an open seen, -1 for a close."""
        try:
            relative = Path(path).relative_to(self.root)
        except ValueError:
            return
        parts = relative.parts
        if not parts or any(is_ignored(part) for part in parts):
            return
        if not self.config.recursive and len(parts) > 1:
            return
        key = relative.as_posix()
        if key in self.handed_out:
            return
        seen = self.pending.get(key)
        if seen is None:
            info = self._lstat(path)
            if info is None or stat.S_ISDIR(info.st_mode):
                return
            self.on_detected(by_scan)
            seen = self.pending[key] = Pending(info.st_size, info.st_mtime_ns, now, time.time())
        # Counted, not paired: events name no process, and inotify merges identical events
        # that follow each other. A count that sticks above zero ends at the grace time.
        seen.open = max(seen.open + opens, 0)

    def _settled(self, now: float) -> list[Ready]:
        ready = []
        for key, seen in list(self.pending.items()):
            info = self._lstat(str(self.root / key))
            if info is None:
                del self.pending[key]
                self._forget_unfinished(key)
                continue
            if (info.st_size, info.st_mtime_ns) != (seen.size, seen.mtime_ns):
                seen.size, seen.mtime_ns, seen.unchanged_since = info.st_size, info.st_mtime_ns, now
                continue
            quiet = now - seen.unchanged_since
            if quiet < self.settle or self._held(key, seen, quiet, now):
                continue
            del self.pending[key]
            self.handed_out.add(key)
            ready.append(Ready(key, seen.detected_at))
        return ready

    def _held(self, key: str, seen: Pending, quiet: float, now: float) -> bool:
        """A settled file that may still be arriving: open in a process, or put back for
        looking cut short; either until it has been unchanged for the grace time."""
        if seen.open and quiet < self.grace:
            return True
        if seen.open:
            log.warning("inbox %s: %s is still open in a process but unchanged for %.0f s; "
                        "taking it", self.config.name, key, quiet)  # fmt: skip
            seen.open = 0
        with self.lock:
            put_back = self.unfinished.get(key)
            if put_back is None:
                return False
            if (seen.size, seen.mtime_ns) != (put_back.size, put_back.mtime_ns):
                del self.unfinished[key]  # written to since: an ordinary file again
                return False
            return now - put_back.since < self.grace

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
        """Files seen and not handed out yet, counting those put back for looking cut short
        that no scan has found again yet."""
        with self.lock:
            put_back = list(self.unfinished)
        return bool(self.pending) or any(self._lstat(str(self.root / k)) for k in put_back)

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
        """The service tried to claim a ready file: a new file of that name counts as new."""
        self.handed_out.discard(relative)
