"""Noticing files in an inbox, and deciding when each one is completely written.

Events are hints, the folder listing is the truth: watchdog reports nothing for files present at
start, drops events when inotify's queue overflows, and sees nothing another machine writes to a
network share. So every inbox is also scanned at start and periodically. Events only make a file
known sooner; it is ready once its size *and* mtime have not changed for ``settle_ms`` (Windows
Explorer sets the final size at the start of an SMB copy, so size alone lies).

Watchdog callbacks run on its one dispatcher thread and only enqueue; all work is in ``step()``.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import queue
import stat
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
RESCAN = "\0rescan"  # hint: list the whole inbox now (a folder appeared or moved in)


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


@dataclass(frozen=True)
class Ready:
    relative: str
    detected_at: float


class _Hints(FileSystemEventHandler):
    """Turns watchdog events into relative paths on a queue; nothing else."""

    def __init__(self, root: Path, hints: queue.SimpleQueue[str]) -> None:
        self.root = root
        self.hints = hints

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, DirCreatedEvent | DirMovedEvent):
            self.hints.put(RESCAN)
            return
        if event.is_directory or event.event_type in ("deleted", "opened", "closed_no_write"):
            return
        for path in (event.src_path, getattr(event, "dest_path", "")):
            if path:
                self.hints.put(os.fsdecode(path))


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
        self.scan_interval = scan_interval
        self.observe = observe
        self.on_detected = on_detected
        self.on_restart = on_restart
        self.pending: dict[str, Pending] = {}
        self.handed_out: set[str] = set()  # ready, until the service says it tried to claim it
        self.hints: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.next_scan = clock_start  # scan at the first step
        self.observer: BaseObserver | None = None
        self.root_inode = 0
        self.warned: set[tuple[Path, str]] = set()

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
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
        log.warning(
            "inbox %s: watcher stopped (folder gone or replaced); restarting it", self.config.name
        )
        self.stop()
        self.on_restart()
        self.start()
        self.hints.put(RESCAN)

    def step(self, now: float) -> list[Ready]:
        """Take hints, scan when due, and return the files that have settled."""
        if self.observe and not self.healthy():
            self.restart_observer()
        rescan = now >= self.next_scan
        while True:
            try:
                hint = self.hints.get_nowait()
            except queue.Empty:
                break
            if hint == RESCAN:
                rescan = True
            else:
                self._note(hint, now, by_scan=False)
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

    def _note(self, path: str, now: float, by_scan: bool) -> None:
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
        if key in self.pending or key in self.handed_out:
            return
        info = self._lstat(path)
        if info is None or stat.S_ISDIR(info.st_mode):
            return
        self.on_detected(by_scan)
        self.pending[key] = Pending(info.st_size, info.st_mtime_ns, now, time.time())

    def _settled(self, now: float) -> list[Ready]:
        ready = []
        for key, seen in list(self.pending.items()):
            info = self._lstat(str(self.root / key))
            if info is None:
                del self.pending[key]
                continue
            if (info.st_size, info.st_mtime_ns) != (seen.size, seen.mtime_ns):
                seen.size, seen.mtime_ns, seen.unchanged_since = info.st_size, info.st_mtime_ns, now
                continue
            if now - seen.unchanged_since >= self.settle:
                del self.pending[key]
                self.handed_out.add(key)
                ready.append(Ready(key, seen.detected_at))
        return ready

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
