"""The exactly-once protocol: a file belongs to the daemon that renamed it into its work folder.

Layout inside each inbox (same filesystem, so every move is an atomic rename)::

    .hotfolder/owners/<owner>               heartbeat of a running daemon (mtime refreshed)
    .hotfolder/work/<owner>/<job>/job.json  where the file came from, attempts so far, outcome
    .hotfolder/work/<owner>/<job>/source    the claimed file itself

Renaming is the only lock: exactly one daemon wins the rename of a given file, wherever the
daemons run (no flock, which NFS emulates and CIFS ``nobrl`` disables). A job whose owner died is
adopted by renaming its folder, which again only one daemon can win, and is processed again; the
attempt count it carries sends a file that keeps crashing the process to errors/.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath

from hotfolder.publish import Permissions, fsync_dir, write_in

WORK_DIR = ".hotfolder"
JOB_FILE = "job.json"
SOURCE = "source"
# A daemon on another host whose heartbeat is older than this is taken for dead.
LEASE_SECONDS = 60.0


@dataclass(frozen=True)
class Claim:
    """A file taken from an inbox: ``folder/source`` holds it until it is archived."""

    job_id: str
    inbox: str
    relative: str  # POSIX path inside the inbox
    folder: Path
    size: int
    detected_at: float
    claimed_at: float
    attempts: int = 0
    outcome: str = ""  # set just before the source leaves the work folder

    @property
    def source(self) -> Path:
        return self.folder / SOURCE

    @property
    def name(self) -> str:
        return PurePosixPath(self.relative).name


def _read_record(folder: Path) -> Claim | None:
    """The claim recorded in ``folder``, or None when the record is missing, unreadable, of
    another shape, or names a path that leaves the inbox."""
    try:
        saved = json.loads((folder / JOB_FILE).read_text(encoding="utf-8"))
        saved["folder"] = folder
        claim = Claim(**saved)
    except (OSError, ValueError, TypeError):
        return None
    relative = PurePosixPath(claim.relative) if isinstance(claim.relative, str) else None
    if relative is None or relative.is_absolute() or ".." in relative.parts or not relative.name:
        return None
    fields = (claim.size, claim.attempts)
    if not all(isinstance(v, int) for v in fields) or not isinstance(claim.outcome, str):
        return None
    return claim


def owner_name() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())
    return f"{host}.{os.getpid()}.{uuid.uuid4().hex[:6]}"


def _host_and_pid(owner: str) -> tuple[str, int]:
    host, pid, _ = owner.rsplit(".", 2)
    return host, int(pid)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ClaimStore:
    """Claims for one inbox, owned by this process."""

    def __init__(self, inbox: str, root: Path, owner: str | None = None) -> None:
        self.inbox = inbox
        self.root = root
        self.owner = owner or owner_name()
        self.base = root / WORK_DIR
        self.mine = self.base / "work" / self.owner
        self.heartbeat_file = self.base / "owners" / self.owner
        self.heartbeat_at = 0.0

    def open(self) -> None:
        self.mine.mkdir(parents=True, exist_ok=True)
        self.heartbeat()

    def heartbeat(self) -> None:
        # mkdir each time: someone may have deleted and recreated the whole inbox.
        self.heartbeat_file.parent.mkdir(parents=True, exist_ok=True)
        self.heartbeat_file.touch()
        self.heartbeat_at = time.monotonic()

    def has_jobs(self) -> bool:
        try:
            return any(self.mine.iterdir())
        except FileNotFoundError:
            return False

    def close(self) -> None:
        """Forget this owner; only once every claim is finished or released."""
        with contextlib.suppress(OSError):
            self.mine.rmdir()
            self.heartbeat_file.unlink()

    def claim(self, relative: str, detected_at: float) -> Claim | None:
        """Take ``relative`` out of the inbox; None when it vanished or another daemon won."""
        source = self.root / relative
        try:
            size = source.lstat().st_size
        except FileNotFoundError:
            return None
        job_id = uuid.uuid4().hex
        folder = self.mine / job_id
        folder.mkdir(parents=True)
        claim = Claim(job_id, self.inbox, relative, folder, size, detected_at, time.time())
        self._save(claim)
        try:
            os.rename(source, claim.source)
        except OSError:
            # NFS may report a failed rename that did happen (a retransmitted request).
            if not os.path.lexists(claim.source):
                shutil.rmtree(folder, ignore_errors=True)
                return None
        fsync_dir(folder)
        return claim

    def record_attempt(self, claim: Claim) -> Claim:
        """Persist one more attempt before the file goes near the model."""
        updated = replace(claim, attempts=claim.attempts + 1)
        self._save(updated)
        return updated

    def record_outcome(self, claim: Claim, outcome: str) -> Claim:
        updated = replace(claim, outcome=outcome)
        self._save(updated)
        return updated

    def release(self, claim: Claim) -> bool:
        """Put an unstarted claim back where it was found. False if that name is taken again
        (the claim then stays here and is recovered at the next start)."""
        target = self.root / claim.relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(target):
            return False
        os.rename(claim.source, target)
        self.finish(claim)
        return True

    def reread(self, claim: Claim) -> Claim | None:
        """The claim as its job folder records it now; None when the folder, or its file
        before any outcome was recorded, is gone."""
        current = _read_record(claim.folder)
        if current is None or (not current.outcome and not os.path.lexists(current.source)):
            return None
        return current

    def finish(self, claim: Claim) -> None:
        shutil.rmtree(claim.folder, ignore_errors=True)

    def recover(self) -> list[Claim]:
        """Adopt the jobs of daemons that died (this host: their process is gone; elsewhere:
        their heartbeat is older than the lease)."""
        work = self.base / "work"
        adopted = []
        for owner_dir in sorted(work.iterdir()) if work.is_dir() else []:
            if owner_dir.name == self.owner or not self._is_dead(owner_dir.name):
                continue
            for job_dir in sorted(owner_dir.iterdir()):
                claim = self._adopt(job_dir)
                if claim is not None:
                    adopted.append(claim)
            with contextlib.suppress(OSError):
                owner_dir.rmdir()
                (self.base / "owners" / owner_dir.name).unlink()
        return adopted

    def _is_dead(self, owner: str) -> bool:
        try:
            host, pid = _host_and_pid(owner)
        except ValueError:
            return False  # not a folder of ours
        if host == _host_and_pid(self.owner)[0]:
            return not _process_alive(pid)
        try:
            age = time.time() - (self.base / "owners" / owner).stat().st_mtime
        except FileNotFoundError:
            return True
        return age > LEASE_SECONDS

    def _adopt(self, job_dir: Path) -> Claim | None:
        target = self.mine / job_dir.name
        if job_dir != target:
            try:
                os.rename(job_dir, target)
            except OSError:
                return None  # another daemon adopted it first
        claim = _read_record(target)
        if claim is None:
            # Died between creating the folder and claiming: nothing was taken. A source
            # without a usable record cannot happen (the record is written first), but if it
            # ever does, the file goes back to the inbox under a name that says so.
            if os.path.lexists(target / SOURCE):
                os.rename(target / SOURCE, self.root / f"recovered-{job_dir.name}")
            shutil.rmtree(target, ignore_errors=True)
            return None
        if not os.path.lexists(claim.source) and not claim.outcome:
            shutil.rmtree(target, ignore_errors=True)  # the claim itself never happened
            return None
        return claim

    def _save(self, claim: Claim) -> None:
        record = asdict(claim)
        del record["folder"]
        # Never re-create a job folder that vanished (inbox deleted, share dropped): a record
        # without its file would later read as a job whose original was archived.
        folder = os.open(claim.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            write_in(folder, JOB_FILE, json.dumps(record).encode(), Permissions())
        finally:
            os.close(folder)
