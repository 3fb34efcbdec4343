"""Atomic writes: a reader of the outbox sees a complete file or none at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

DEFAULT_FILE_MODE = 0o644


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = DEFAULT_FILE_MODE) -> None:
    """Write ``data`` to a hidden temp file beside ``path``, fsync it, rename it over ``path``,
    then fsync the folder so the rename itself survives a power cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:200]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    fsync_dir(path.parent)
