"""Atomic writes into the outbox, and durable moves of originals to done/ or errors/.

A reader of the outbox sees a complete file or none at all; an original leaves the work folder
only after every output of its job is durable.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

DEFAULT_FILE_MODE = 0o644
MAX_NAME_BYTES = 255


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
            _write_synced(f, data, mode)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    fsync_dir(path.parent)


def _write_synced(f: BinaryIO, data: bytes, mode: int) -> None:
    f.write(data)
    f.flush()
    os.fchmod(f.fileno(), mode)
    os.fsync(f.fileno())


def move_file(source: Path, target: Path) -> None:
    """Move a file, durably: a rename on one filesystem, copy + fsync + unlink across two."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        temp = target.with_name(f".{target.name[:200]}.{os.getpid()}.tmp")
        shutil.copy2(source, temp, follow_symlinks=False)
        if not temp.is_symlink():
            with temp.open("rb") as f:
                os.fsync(f.fileno())
        os.replace(temp, target)
        fsync_dir(target.parent)
        os.unlink(source)
        return
    fsync_dir(target.parent)


def free_name(target: Path, tag: str) -> Path:
    """``target``, or ``<stem>.<tag><suffix>`` beside it when that name is taken: an archived
    original never replaces an earlier one of the same name."""
    if not os.path.lexists(target):
        return target
    return target.with_name(f"{target.stem}.{tag}{target.suffix}")


def place_outputs(files: list[tuple[Path, bytes]], staging: Path, mode: int) -> None:
    """Write every output into ``staging`` (a work folder on the inbox's filesystem), then rename
    each into the outbox, so the outbox never holds a partial or temporary file. An existing
    output of the same name is replaced: processing a job twice leaves one set of outputs."""
    staging.mkdir(parents=True, exist_ok=True)
    staged = []
    for index, (target, data) in enumerate(files):
        path = staging / f"output-{index}"
        with path.open("wb") as f:
            _write_synced(f, data, mode)
        staged.append((path, target, data))
    renamed_into = set()
    for path, target, data in staged:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            write_atomic(target, data, mode)  # another filesystem: hidden temp beside it
            continue
        renamed_into.add(target.parent)
    for folder in renamed_into:  # once per folder: a job's outputs usually share one
        fsync_dir(folder)


def error_report_path(target: Path, tag: str) -> Path:
    """``<name>.error.json`` beside the rejected file; for a name near the 255-byte limit, the
    name is shortened and tagged so the report still fits and stays unique."""
    name = f"{target.name}.error.json"
    if len(name.encode()) > MAX_NAME_BYTES:
        short = target.name.encode()[:200].decode(errors="ignore")
        name = f"{short}.{tag}.error.json"
    return target.with_name(name)


def write_error_report(sidecar: Path, report: dict[str, object]) -> None:
    write_atomic(sidecar, (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode())
