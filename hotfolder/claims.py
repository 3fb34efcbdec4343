"""The exactly-once protocol: a file belongs to the daemon that renamed it into its work folder.

Layout inside each inbox (same filesystem, so every move is an atomic rename)::

    .hotfolder/owners/<owner>               heartbeat of a running daemon (mtime refreshed)
    .hotfolder/work/<owner>/<job>/job.json  where the file came from, attempts so far, outcome
    .hotfolder/work/<owner>/<job>/source    the claimed file itself

    .hotfolder/activity/<owner>             what each job of that daemon is doing (decode, model…)

Renaming is the only lock: exactly one daemon wins the rename of a given file, wherever the
daemons run (no flock, which NFS emulates and CIFS ``nobrl`` disables). A job whose owner died is
adopted by renaming its folder, which again only one daemon can win, and is processed again.

Who is to blame when a process dies? Not every file it held: a ``kill -9``, a power cut or a lost
GPU kills a whole batch of good photos. The activity log says which jobs were being decoded,
in the model or encoded at that moment (appended, one line a step, no fsync: a process that
dies leaves the page cache behind). Those *suspects* are not charged; they are retried alone
(``solo``), before any other work, one after another. Only a file that was alone in the process
when it died is charged a crash; ``max_attempts`` crashes send it to errors/.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath

from hotfolder.names import escape
from hotfolder.publish import Permissions, fsync_dir, write_in

logger = logging.getLogger(__name__)

WORK_DIR = ".hotfolder"
JOB_FILE = "job.json"
SOURCE = "source"
# A daemon on another host whose heartbeat is older than this is taken for dead.
LEASE_SECONDS = 60.0
ACTIVITY = "activity"
# Phases written to the activity log. A job whose last phase is one of SUSPECT when its daemon
# died was being decoded, in the model, or being encoded; the others were waiting in a queue.
DECODE, DECODED, MODEL, INFERRED, ENCODE = "decode", "decoded", "model", "inferred", "encode"
SUSPECT = {DECODE, MODEL, ENCODE}
ACTIVITY_LINES = 10_000  # the log is rewritten from memory, short, past this many lines


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
    attempts: int = 0  # times its processing started (for the journal and error reports)
    outcome: str = ""  # set just before the source leaves the work folder
    solo: bool = False  # was active when a process died: retried alone before anything else
    crashes: int = 0  # times the process died while it was alone in it
    archived_as: str = ""  # where the original goes (under done/ or errors/), decided once
    mtime_ns: int = 0  # the file's mtime when claimed (0: not recorded), to see it change

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
    fields = (claim.size, claim.attempts, claim.crashes)
    if not all(isinstance(v, int) for v in fields) or not isinstance(claim.outcome, str):
        return None
    archived = PurePosixPath(claim.archived_as) if isinstance(claim.archived_as, str) else None
    if archived is None or archived.is_absolute() or ".." in archived.parts:
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
        self.activity_file = self.base / ACTIVITY / self.owner
        self.phases: dict[str, str] = {}  # job id -> last phase written, for unfinished jobs
        self.activity_lines = 0
        self.activity_lock = threading.Lock()
        self.activity_failing = False
        self.unmovable: set[str] = set()  # files the daemon may not move out of the inbox

    def open(self) -> None:
        self.mine.mkdir(parents=True, exist_ok=True)
        self.activity_file.parent.mkdir(parents=True, exist_ok=True)
        self.heartbeat()

    def note(self, phase: str, claims: Iterable[Claim]) -> None:
        """Append ``<phase> <job> <job> …`` to this daemon's activity log. Not fsynced: it only
        has to outlive this process, not the machine (after a power cut every job is a
        suspect, retried alone, and nobody is charged for it)."""
        jobs = [c.job_id for c in claims]
        if not jobs:
            return
        with self.activity_lock:
            self.phases.update(dict.fromkeys(jobs, phase))
            self.activity_lines += 1
            try:
                if self.activity_lines > ACTIVITY_LINES:
                    self._compact_activity()
                else:
                    with self.activity_file.open("a", encoding="ascii") as log:
                        log.write(f"{phase} {' '.join(jobs)}\n")
                self.activity_failing = False
            except OSError as exc:
                # Advisory: without it the jobs of a dead daemon are all suspects, retried
                # alone, and nobody is charged. Not worth stopping for, nor a line per file.
                if not self.activity_failing:
                    logger.warning("%s: cannot write the activity log: %s", self.inbox, exc)
                self.activity_failing = True

    def _compact_activity(self) -> None:
        """Rewrite the log as one line per unfinished job, atomically."""
        lines = "".join(f"{phase} {job}\n" for job, phase in self.phases.items())
        temp = self.activity_file.with_name(f".{self.owner}.tmp")
        temp.write_text(lines, encoding="ascii")
        os.replace(temp, self.activity_file)
        self.activity_lines = len(self.phases)

    def _forget_activity(self, claim: Claim) -> None:
        with self.activity_lock:
            self.phases.pop(claim.job_id, None)

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
            self.activity_file.unlink(missing_ok=True)

    def claim(self, relative: str, detected_at: float) -> Claim | None:
        """Take ``relative`` out of the inbox; None when it vanished or another daemon won."""
        source = self.root / relative
        try:
            info = source.lstat()
        except OSError:
            return None  # gone, or out of reach (the watcher says why)
        job_id = uuid.uuid4().hex
        folder = self.mine / job_id
        folder.mkdir(parents=True)
        claim = Claim(job_id, self.inbox, relative, folder, info.st_size, detected_at,
                      time.time(), mtime_ns=info.st_mtime_ns)  # fmt: skip
        self._save(claim)
        try:
            os.rename(source, claim.source)
        except OSError as exc:
            # NFS may report a failed rename that did happen (a retransmitted request).
            if not os.path.lexists(claim.source):
                shutil.rmtree(folder, ignore_errors=True)
                if exc.errno != errno.ENOENT and relative not in self.unmovable:
                    self.unmovable.add(relative)  # say so once, not at every scan
                    logger.warning("%s/%s: cannot take it (%s); it stays in the inbox",
                                   self.inbox, escape(relative), exc.strerror)  # fmt: skip
                return None
        fsync_dir(folder)
        return claim

    def record_attempt(self, claim: Claim, persist: bool = False) -> Claim:
        """One more attempt; written to the job record only when ``persist`` (the count is for
        people; crashes are charged through the activity log)."""
        updated = replace(claim, attempts=claim.attempts + 1)
        if persist:
            self._save(updated)
        return updated

    def record_outcome(self, claim: Claim, outcome: str, archived_as: str = "") -> Claim:
        """How the job ends, and where its original goes, before the original moves."""
        updated = replace(claim, outcome=outcome, archived_as=archived_as)
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
        self._forget_activity(claim)

    def recover(self) -> list[Claim]:
        """Adopt the jobs of daemons that died (this host: their process is gone; elsewhere:
        their heartbeat is older than the lease)."""
        work = self.base / "work"
        adopted = []
        for owner_dir in sorted(work.iterdir()) if work.is_dir() else []:
            if owner_dir.name == self.owner or not self._is_dead(owner_dir.name):
                continue
            phases = self._read_activity(owner_dir.name)
            for job_dir in sorted(owner_dir.iterdir()):
                claim = self._adopt(job_dir)
                if claim is not None:
                    adopted.append(self._blame(claim, phases.get(claim.job_id, "")))
            with contextlib.suppress(OSError):
                owner_dir.rmdir()
                (self.base / "owners" / owner_dir.name).unlink()
                (self.base / ACTIVITY / owner_dir.name).unlink(missing_ok=True)
        return adopted

    def _read_activity(self, owner: str) -> dict[str, str]:
        """The last phase of each job in a dead daemon's activity log."""
        phases: dict[str, str] = {}
        try:
            text = (self.base / ACTIVITY / owner).read_text(encoding="ascii", errors="replace")
        except OSError:
            return phases
        for line in text.splitlines():
            phase, *jobs = line.split()
            phases.update(dict.fromkeys(jobs, phase))
        return phases

    def _blame(self, claim: Claim, phase: str) -> Claim:
        """A job that was being decoded or in the model when its daemon died: charged a crash
        if it was a suspect already (suspects run alone), else made one."""
        if phase not in SUSPECT or claim.outcome:
            return claim
        if claim.solo:
            claim = replace(claim, crashes=claim.crashes + 1)
        else:
            claim = replace(claim, solo=True)
        self._save(claim)
        return claim

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
