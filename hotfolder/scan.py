"""Listing an inbox a little at a time, and not listing again the folders that did not change.

A backlog of 100 000 files must not cost 100 000 system calls on every scan, nor keep the daemon
from taking its first file until the whole tree is listed. A scan *pass* walks the tree one
folder at a time, at most ``SCAN_BUDGET`` entries per step, and offers each candidate file to the
watcher. The watcher refuses a file when its set of tracked files is full: the pass then pauses
on that file and goes on once there is room. So the first files are taken after one folder is
listed, and memory holds the unread rest of one folder's listing, never the tree's.

A folder whose mtime (and inode) is what it was when it was last listed to the end is not listed
again: a file created in, renamed into or removed from a folder changes its mtime (a file
written in place does not, but the watcher already tracks it). mtime is trusted only within
limits:

- granularity: a file created just after a listing, in the same tick of the file system's clock
  (2 s on FAT, 1 s or coarser on some shares), leaves the mtime as it was. A folder whose mtime
  is less than ``MTIME_MARGIN_NS`` older than the listing is listed again at the next pass.
- network shares: attributes cached by the client (NFS ``acdirmax``, up to a minute) and clocks
  that differ between server and client. Every folder is listed again at least every
  ``RELIST_SECONDS``, whatever its mtime says.

The watcher also marks a folder to be listed again (``dirty``) when it could not track one of its
files, or handed one out that may still be there.

Cost: one ``stat`` a folder a pass for folders that did not change; one listing a folder that
did, and one offer per file in it. Memory: a small record a folder (its mtime and subfolder
names), plus the names not yet offered of the folder being read (about 100 bytes a name).
"""

from __future__ import annotations

import fnmatch
import os
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
# One expression for all of them: every name of a listing goes through it.
_IGNORED = re.compile("|".join(fnmatch.translate(pattern) for pattern in IGNORED_NAMES))

# Entries (listed, offered, or folders looked at) one step may go through, so that a step stays
# short whatever the tree: a pass over a large tree is spread over many steps. (A folder is
# listed whole, in one step, however many entries it has.)
SCAN_BUDGET = 5_000
MTIME_MARGIN_NS = 2_000_000_000  # FAT's 2 s, the coarsest mtime in common use
RELIST_SECONDS = 60.0


@dataclass(slots=True)
class Folder:
    """What a folder looked like when it was last listed."""

    mtime_ns: int
    inode: int  # another folder moved in under its name may have the same mtime
    listed_at: float  # on the step clock
    trusted: bool  # its mtime was older than the listing by MTIME_MARGIN_NS
    subfolders: tuple[str, ...]  # keys of the folders in it
    files: int  # files in it (names not ignored, not folders)
    complete: bool = True  # False: to be listed again at the next pass


def is_ignored(name: str) -> bool:
    return _IGNORED.match(name.lower()) is not None


def child(folder: str, name: str) -> str:
    """The key (POSIX path relative to the inbox) of ``name`` in ``folder`` ("" the inbox)."""
    return f"{folder}/{name}" if folder else name


def parent(key: str) -> str:
    return key.rpartition("/")[0]


class TreeScan:
    """Passes over one inbox's tree. ``step()`` goes on with the pass in progress, if any.

    Each pass also counts the files it finds (``found``; those of a folder not listed again are
    its count when it was). With ``collect`` False a pass only counts: no file is offered, no
    name kept, and it never pauses."""

    def __init__(
        self, root: Path, recursive: bool, warn: Callable[[Path, str], None], collect: bool = True
    ) -> None:
        self.root = root
        self.recursive = recursive
        self.warn = warn
        self.collect = collect
        self.folders: dict[str, Folder] = {}
        self.active = False  # a pass is in progress
        self.found = 0  # files this pass found so far
        self.last_found: int | None = None  # files the last pass found to the end
        self.stack: list[str] = []  # folders this pass still has to look at
        self.files: deque[str] = deque()  # files of the folder being read, not offered yet
        self.reading: tuple[str, Folder] | None = None  # that folder, and its record to be

    def start(self) -> None:
        """Begin a pass at the inbox folder (a pass in progress goes on instead)."""
        if not self.active:
            self.active = True
            self.stack = [""]
            self.found = 0

    def forget(self) -> None:
        """List every folder again (the inbox folder was replaced)."""
        self.folders.clear()

    def dirty(self, folder: str) -> None:
        """List ``folder`` again at the next pass, whatever its mtime says."""
        known = self.folders.get(folder)
        if known is not None:
            known.complete = False
        if self.reading is not None and self.reading[0] == folder:
            self.reading[1].complete = False

    def step(self, now: float, offer: Callable[[str], bool]) -> None:
        """Go on with the pass: ``offer(key)`` each file found; it returns False when the
        watcher has no room, and the pass stops on that file until the next step."""
        budget = SCAN_BUDGET
        while self.active and budget > 0:
            if self.files:
                if not offer(self.files[0]):
                    return
                self.files.popleft()
                budget -= 1
            elif self.reading is not None:
                key, record = self.reading
                self.folders[key] = record
                self.reading = None
            elif self.stack:
                budget -= self._visit(self.stack.pop(), now)
            else:
                self.active = False
                self.last_found = self.found

    def _visit(self, folder: str, now: float) -> int:
        """Look at one folder: list it if it may have changed. Returns the entries it cost."""
        path = self.root / folder if folder else self.root
        try:
            info = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._drop(folder)
            return 1
        except OSError as exc:  # no permission, a path past PATH_MAX: skip it, serve on
            self.warn(path, f"cannot look at this folder ({exc.strerror})")
            return 1
        known = self.folders.get(folder)
        if known is not None and self._unchanged(known, info, now):
            self.stack.extend(known.subfolders)
            self.found += known.files
            return 1
        listed_at_ns = time.time_ns()
        try:
            with os.scandir(path) as listing:
                entries = list(listing)
        except (FileNotFoundError, NotADirectoryError):
            self._drop(folder)
            return 1
        except OSError as exc:
            self.warn(path, f"cannot list this folder ({exc.strerror})")
            return 1
        subfolders = []
        files = 0
        for entry in entries:
            if is_ignored(entry.name):
                continue
            if entry.is_dir(follow_symlinks=False):
                if self.recursive:
                    subfolders.append(child(folder, entry.name))
                continue
            files += 1
            if self.collect:
                self.files.append(child(folder, entry.name))
        self.found += files
        if known is not None:
            for gone in set(known.subfolders).difference(subfolders):
                self._drop(gone)
        self.stack.extend(subfolders)
        trusted = info.st_mtime_ns < listed_at_ns - MTIME_MARGIN_NS
        self.reading = (
            folder,
            Folder(info.st_mtime_ns, info.st_ino, now, trusted, tuple(subfolders), files),
        )
        return 1 + len(entries)

    @staticmethod
    def _unchanged(known: Folder, info: os.stat_result, now: float) -> bool:
        return (
            known.complete
            and known.trusted
            and (known.mtime_ns, known.inode) == (info.st_mtime_ns, info.st_ino)
            and now - known.listed_at < RELIST_SECONDS
        )

    def _drop(self, folder: str) -> None:
        """Forget a folder that is gone, and every folder below it."""
        below = f"{folder}/"
        for key in [k for k in self.folders if k == folder or not folder or k.startswith(below)]:
            del self.folders[key]
