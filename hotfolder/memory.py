"""Giving freed heap memory back to the operating system.

Photos of many different sizes leave glibc's heap fragmented: each decode, resize and encode
frees buffers of a new size, glibc raises its mmap threshold up to the largest freed block (up
to 32 MiB) and keeps such blocks in its per-thread arenas, so the resident size of a daemon that
has met thousands of sizes creeps up although nothing is in use. ``malloc_trim(0)`` (glibc 2.8
and later) returns the free pages of every arena to the system, the middle of the heap included
(madvise(MADV_DONTNEED)); the intake calls it every few seconds. Elsewhere (musl, macOS) it does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return None
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim  # type: ignore[no-any-return]


def release_free_memory() -> bool:
    """Return the heap's free pages to the system; True if the C library could."""
    trim = _malloc_trim()
    return bool(trim is not None and trim(0))
