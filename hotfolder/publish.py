"""Atomic writes into the outbox, and durable moves of originals to done/ or errors/.

A reader of the outbox sees a complete file or none at all; an original leaves the work folder
only after every output of its job is durable.

Nothing is ever written through a symbolic link below a configured root (outbox, done, errors):
the folders under a root are opened one component at a time with ``O_NOFOLLOW`` and every file
operation is made relative to the opened folder (``dir_fd``), so a link planted in the outbox
(``outbox/evil -> /etc``) cannot send a file elsewhere, even if it appears between a check and
a write. The roots themselves are the operator's choice and may be links.

Modes and group are set explicitly on every file and folder created here, whatever the
process's umask, so the other users of a share can read the results (:class:`Permissions`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from hotfolder import names

DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755
MAX_EXT_BYTES = 32  # a longer "extension" (a name like "a." + 253 letters) is part of the stem
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


@dataclass(frozen=True)
class Permissions:
    """Mode bits for the files and folders the daemon creates, and their group (a gid, or None
    to keep the process's group)."""

    file_mode: int = DEFAULT_FILE_MODE
    dir_mode: int = DEFAULT_DIR_MODE
    gid: int | None = None


DEFAULT_PERMISSIONS = Permissions()


class RefusedPathError(OSError):
    """A path below a root that nothing is written to; the file it was for goes to errors/."""


class UnsafePathError(RefusedPathError):
    """A folder below a root is a symbolic link: writing through it could land anywhere."""


class NameTakenError(RefusedPathError):
    """A file holds the name of a folder the outputs need, or a folder the name of a file
    (``x.png`` the cutout of ``x.jpg``, and ``x.png/`` a folder of photos)."""


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_folder(
    root: Path, folder: PurePosixPath, perms: Permissions = DEFAULT_PERMISSIONS
) -> Iterator[int]:
    """A descriptor of ``root/folder``, creating the missing folders below ``root`` with
    ``perms``; closed on exit.

    Raises UnsafePathError if a component below ``root`` is a symbolic link or not a folder;
    OSError (e.g. ENOENT, ENOTDIR) if ``root`` itself cannot be opened: a root that vanished is
    never re-created here, since a share that dropped leaves a bare mountpoint behind.
    """
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in folder.parts:
            child = _descend(fd, part, root, folder, perms)
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def _descend(fd: int, part: str, root: Path, folder: PurePosixPath, perms: Permissions) -> int:
    """Open (creating it if needed) the folder ``part`` inside the open folder ``fd``."""
    created = True
    try:
        os.mkdir(part, perms.dir_mode, dir_fd=fd)
    except FileExistsError:
        created = False
    try:
        child = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        where = f"{names.escape(str(root / folder))}: {names.escape(part)}"
        if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
            message = f"{where} is a symbolic link; not writing through it"
            raise UnsafePathError(exc.errno, message) from None
        raise NameTakenError(exc.errno, f"{where} is a file, not a folder") from None
    if created:
        _apply(child, perms.dir_mode, perms.gid)
    return child


def _apply(fd: int, mode: int, gid: int | None) -> None:
    os.fchmod(fd, mode)  # explicit: the umask does not decide who can read the results
    if gid is not None:
        os.fchown(fd, -1, gid)


def exists_in(folder_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _temp_name(name: str) -> str:
    """A hidden, unique temp name beside ``name`` that still fits NAME_MAX."""
    return "." + names.fit(name, f".{secrets.token_hex(4)}.tmp", names.NAME_MAX - 1)


def write_in(folder_fd: int, name: str, data: bytes, perms: Permissions) -> None:
    """Write ``data`` as ``name`` in an open folder: a hidden temp file, fsync, rename over
    ``name``, fsync the folder."""
    temp = _temp_name(name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, perms.file_mode, dir_fd=folder_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_synced(f, data, perms)
        os.replace(temp, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=folder_fd)
        raise
    os.fsync(folder_fd)


def write_atomic(path: Path, data: bytes, mode: int = DEFAULT_FILE_MODE) -> None:
    """Write ``data`` to a hidden temp file beside ``path``, fsync it, rename it over ``path``,
    then fsync the folder so the rename itself survives a power cut. For paths the caller
    chose (work files, ``hotfolder matte`` outputs); daemon outputs go through
    :func:`place_outputs`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(path.parent, _DIR_FLAGS)
    try:
        write_in(folder, path.name, data, Permissions(file_mode=mode))
    finally:
        os.close(folder)


def _write_synced(f: BinaryIO, data: bytes, perms: Permissions) -> None:
    f.write(data)
    f.flush()
    _apply(f.fileno(), perms.file_mode, perms.gid)
    os.fsync(f.fileno())


def archive(
    source: Path, root: Path, relative: str, tag: str, perms: Permissions = DEFAULT_PERMISSIONS
) -> PurePosixPath:
    """Move the file ``source`` to ``root/relative`` durably (a rename on one filesystem, copy +
    fsync + unlink across two), never replacing a file already there: if one has taken the
    name since :func:`archive_name` chose it, the newcomer gets ``<stem>.<tag><ext>``. Returns
    the path it got, relative to ``root``.

    Raises UnsafePathError for a symbolic link below ``root``, OSError for the rest."""
    target = PurePosixPath(relative)
    with open_folder(root, target.parent, perms) as folder:
        name = names.fit_name(target.name)
        if exists_in(folder, name):
            name = _tagged(name, tag)
        try:
            os.rename(source, name, dst_dir_fd=folder)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _copy_in(source, folder, name)
            os.unlink(source)
        os.fsync(folder)
    return target.parent / name


def archive_name(
    root: Path,
    relative: str,
    tag: str,
    with_report: bool,
    perms: Permissions = DEFAULT_PERMISSIONS,
) -> PurePosixPath:
    """Where an original bound for ``root/relative`` will go (relative to ``root``): that name,
    or ``<stem>.<tag><ext>`` when it is taken; with ``with_report``, the name of its
    ``.error.json`` report must be free too, so a report never replaces an earlier file.

    Raises UnsafePathError for a symbolic link below ``root``."""
    target = PurePosixPath(relative)
    with open_folder(root, target.parent, perms) as folder:
        for name in (names.fit_name(target.name), _tagged(target.name, tag)):
            report = error_report_name(name, tag)
            if not exists_in(folder, name) and not (with_report and exists_in(folder, report)):
                return target.parent / name
    return target.parent / _tagged(target.name, secrets.token_hex(8))  # both taken: very rare


def _copy_in(source: Path, folder_fd: int, name: str) -> None:
    temp = _temp_name(name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, 0o600, dir_fd=folder_fd)
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as f:
            shutil.copyfileobj(f, out)
            out.flush()
            os.fchmod(out.fileno(), os.stat(source).st_mode & 0o7777)
            os.fsync(out.fileno())
        os.replace(temp, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=folder_fd)
        raise


def _tagged(name: str, tag: str) -> str:
    """``<stem>.<tag><ext>``, shortened to fit; an "extension" over 32 bytes is no extension."""
    stem, ext = os.path.splitext(name)
    if names.byte_length(ext) > MAX_EXT_BYTES:
        stem, ext = name, ""
    return names.fit(stem, f".{tag}{ext}")


def place_outputs(
    files: list[tuple[PurePosixPath, bytes]],
    outbox: Path,
    staging: Path,
    perms: Permissions = DEFAULT_PERMISSIONS,
) -> None:
    """Write every output into ``staging`` (a work folder on the inbox's filesystem), then rename
    each to its path under ``outbox``, so the outbox never holds a partial or temporary file.
    An existing output of the same name is replaced (the caller chose the names).

    Raises UnsafePathError for a symbolic link below ``outbox``, OSError for the rest."""
    staging.mkdir(exist_ok=True)  # in the job's folder, never re-created if it vanished
    staged = []
    for index, (target, data) in enumerate(files):
        path = staging / f"output-{index}"
        with path.open("wb") as f:
            _write_synced(f, data, perms)
        staged.append((path, target, data))
    for path, target, data in staged:
        with open_folder(outbox, target.parent, perms) as folder:
            try:
                os.replace(path, target.name, dst_dir_fd=folder)
            except OSError as exc:
                if exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                    message = f"{names.escape(str(outbox / target))} is a folder"
                    raise NameTakenError(exc.errno, message) from None
                if exc.errno != errno.EXDEV:
                    raise
                write_in(folder, target.name, data, perms)  # another filesystem
            os.fsync(folder)


def error_report_name(name: str, tag: str) -> str:
    """``<name>.error.json`` for the rejected file ``name``; for a name near the 255-byte limit
    it is shortened and tagged so the report still fits and stays unique."""
    report = f"{name}.error.json"
    if names.byte_length(report) <= names.NAME_MAX:
        return report
    return names.fit(name, f".{tag}.error.json")


def write_error_report(
    root: Path,
    relative: str,
    tag: str,
    report: dict[str, object],
    perms: Permissions = DEFAULT_PERMISSIONS,
) -> None:
    """The ``.error.json`` report of the file that :func:`archive` puts at ``root/relative``
    (a name from :func:`archive_name`)."""
    target = PurePosixPath(relative)
    text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    data = text.encode("utf-8", "backslashreplace")  # a stray raw name must not stop a report
    with open_folder(root, target.parent, perms) as folder:
        write_in(folder, error_report_name(target.name, tag), data, perms)
