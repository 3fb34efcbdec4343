"""Whether the folders a daemon works in are still there, and whether they can take a write.

A share that drops leaves a bare mountpoint behind: the path still exists, on another
filesystem. Writing there would scatter work folders and outputs on the wrong disk, so each
root (inbox, outbox, done, errors) is remembered as it was at start: its filesystem (``st_dev``)
and whether a filesystem was mounted on it. A root that is missing, a mountpoint left bare, or
a plain folder now on another filesystem is *away*.

While something cannot be written (disk full, read-only, a root away) intake pauses. It resumes
only when each folder that failed passes a probe: it is back on its own filesystem, has the free
space the failed work needed (``statvfs``), and a small hidden file can be created, written,
fsynced and deleted in it. A timer alone would resume while the disk is still full, fail the
next batch and pause again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROBE_PREFIX = ".hotfolder-probe-"  # hidden: the watcher never takes it, users never see it
PROBE_BYTES = 4096
AWAY = "io_error"  # the pause reason for a root that is missing or on another filesystem


def device_of(path: Path) -> int | None:
    """The ``st_dev`` of the filesystem ``path`` is on, or None if it cannot be reached."""
    try:
        return os.stat(path).st_dev
    except OSError:
        return None


@dataclass(frozen=True)
class Root:
    """A configured folder as it was at start: its filesystem, and whether it was mounted
    there (its filesystem differs from its parent's, as for a share)."""

    path: Path
    device: int | None
    mounted: bool

    @classmethod
    def of(cls, path: Path) -> Root:
        device = device_of(path)
        return cls(path, device, device is not None and device != device_of(path.parent))

    def present(self) -> bool:
        """The folder is there on a filesystem it may be on: the one it had at start, or, for
        a mountpoint, any filesystem mounted there again (a share re-mounted gets a new
        device number); never the bare mountpoint a dropped share leaves behind."""
        device = device_of(self.path)
        if device is None:
            return False
        if self.mounted:
            return device != device_of(self.path.parent)
        return self.device is None or device == self.device


class Roots:
    """The roots of one inbox (inbox, outbox, done, errors folders), as they were when this
    object was made."""

    def __init__(self, folders: Iterable[Path]) -> None:
        self.roots = [Root.of(path) for path in folders]

    def away(self) -> list[Root]:
        """The roots that are missing, or on a filesystem they may not be on (see
        :meth:`Root.present`)."""
        return [root for root in self.roots if not root.present()]


def probe(folder: Path, need: int = 0) -> OSError | None:
    """None if ``folder`` can take a write now, else the error that says why not.

    ``need``: bytes that must be free for an unprivileged writer (``statvfs`` ``f_bavail``).
    The probe file is hidden, created exclusively, written (``PROBE_BYTES``), fsynced and
    deleted, so a full or read-only filesystem, or one whose writes fail, says so here rather
    than in the middle of a job."""
    try:
        stats = os.statvfs(folder)
        free = stats.f_bavail * stats.f_frsize
        if free < need:
            return OSError(errno.ENOSPC, f"{free} bytes free, {need} needed", str(folder))
        _write_probe(folder)
    except OSError as exc:
        return exc
    return None


def looks_writable(folder: Path, need: int = PROBE_BYTES) -> OSError | None:
    """None if ``folder`` looks writable without writing anything in it (mounted read-write,
    ``need`` bytes free, write permission), else the error a write would meet. For the check
    at start, which must leave no file behind in an outbox that readers watch."""
    try:
        stats = os.statvfs(folder)
    except OSError as exc:
        return exc
    if stats.f_flag & os.ST_RDONLY:
        return OSError(errno.EROFS, "mounted read-only", str(folder))
    free = stats.f_bavail * stats.f_frsize
    if free < need:
        return OSError(errno.ENOSPC, f"{free} bytes free, {need} needed", str(folder))
    if not os.access(folder, os.W_OK | os.X_OK):
        return OSError(errno.EACCES, "no write permission", str(folder))
    return None


def _write_probe(folder: Path) -> None:
    path = folder / f"{PROBE_PREFIX}{secrets.token_hex(4)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        os.write(fd, bytes(PROBE_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def usable(root: Root, need: int = 0) -> bool:
    """``root`` is where it should be and passes :func:`probe`."""
    return root.present() and probe(root.path, need) is None


@dataclass
class Blocked:
    """A root that failed: why, the free space it must offer again, when to probe it next."""

    reason: str
    need: int
    next_probe: float  # monotonic


class Pause:
    """Why intake is paused: the roots that failed, each until it is :func:`usable` again.

    Stage threads call :meth:`hold`; the intake thread calls :meth:`probe_due`. Thread-safe."""

    def __init__(self, interval: float) -> None:
        self.interval = interval  # seconds between two probes of one root
        self._blocked: dict[Root, Blocked] = {}
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        with self._lock:
            return bool(self._blocked)

    def reasons(self) -> set[str]:
        with self._lock:
            return {b.reason for b in self._blocked.values()}

    def hold(self, root: Root, reason: str, now: float, need: int = 0) -> bool:
        """Keep intake paused until ``root`` is usable with ``need`` bytes free; True if the
        root was not held yet."""
        with self._lock:
            old = self._blocked.get(root)
            if old is not None:
                old.need, old.reason = max(old.need, need), reason
                return False
            self._blocked[root] = Blocked(reason, need, now + self.interval)
            return True

    def keep_only(self, roots: Iterable[Root]) -> None:
        """Forget the held roots that are not among ``roots`` (a reload stopped using them)."""
        keep = set(roots)
        with self._lock:
            for root in [r for r in self._blocked if r not in keep]:
                del self._blocked[root]

    def probe_due(self, now: float) -> list[Root]:
        """Probe each held root whose time has come; release and return those that pass.
        Intake may resume once :attr:`active` is false."""
        with self._lock:
            due = [(r, b) for r, b in self._blocked.items() if now >= b.next_probe]
        passed = []
        for root, blocked in due:
            if usable(root, blocked.need):
                passed.append(root)
            else:
                blocked.next_probe = now + self.interval
        with self._lock:
            for root in passed:
                self._blocked.pop(root, None)
        return passed
