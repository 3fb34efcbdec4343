"""A SQLite history of every job: where it came from, when each stage ran, how it ended.

One row per job, keyed by the job id that the claim gave it, so a job resumed after a crash
updates its row instead of adding one. WAL mode lets several daemons on one host share the file.
File names are stored as :func:`hotfolder.names.escape` gives them: UTF-8 text that says which
bytes the name had, whatever they were.

The journal also knows which input owns each output name (``output_names``: the output's escaped
absolute path, and ``<inbox>:<escaped input path>``), so that two different inputs never share
an output name while a re-upload of the same input replaces its own outputs
(:mod:`hotfolder.naming`). Daemons that share one journal also share that knowledge.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# What an output's recipe changed on its own, as JSON: {"quality": {"{stem}.jpg": 71}} when
# max_bytes lowered a JPEG's quality to fit.
NOTES = "notes TEXT"
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    inbox TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER,
    sha256 TEXT,
    detected_at REAL,
    claimed_at REAL,
    inferred_at REAL,
    published_at REAL,
    batch_size INTEGER,
    device TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    outcome TEXT NOT NULL,
    reason TEXT,
    error TEXT,
    outputs TEXT,
    host TEXT,
    notes TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs (claimed_at);
-- The status page's filters and its images-per-minute, without a scan of the table.
CREATE INDEX IF NOT EXISTS jobs_by_inbox ON jobs (inbox, claimed_at);
CREATE INDEX IF NOT EXISTS jobs_by_outcome ON jobs (outcome, claimed_at);
CREATE INDEX IF NOT EXISTS jobs_by_publication ON jobs (published_at);
CREATE TABLE IF NOT EXISTS output_names (
    path TEXT PRIMARY KEY,
    owner TEXT NOT NULL
);
"""

COLUMNS = [
    *("id", "inbox", "path", "size", "sha256", "detected_at", "claimed_at", "inferred_at"),
    *("published_at", "batch_size", "device", "attempts", "outcome", "reason", "error"),
    *("outputs", "host"),
]


@dataclass(frozen=True)
class Row:
    id: str
    inbox: str
    path: str
    size: int | None
    sha256: str | None
    detected_at: float | None
    claimed_at: float | None
    inferred_at: float | None
    published_at: float | None
    batch_size: int | None
    device: str | None
    attempts: int
    outcome: str
    reason: str | None
    error: str | None
    outputs: list[str]
    host: str | None


class Journal:
    """Thread-safe: one connection, one lock (writes are small and rare next to inference)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._locked() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            if "notes" not in columns:  # journals written before outputs had notes
                db.execute(f"ALTER TABLE jobs ADD COLUMN {NOTES}")

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    def close(self) -> None:
        with self._locked() as db:
            db.close()

    def begin(self, job_id: str, **fields: Any) -> None:
        """The job's row, when it has none yet (a resumed job keeps the one it has)."""
        names = ["id", *fields]
        placeholders = ", ".join("?" for _ in names)
        sql = f"INSERT OR IGNORE INTO jobs ({', '.join(names)}) VALUES ({placeholders})"
        with self._locked() as db:
            db.execute(sql, [job_id, *fields.values()])

    def update(self, job_id: str, **fields: Any) -> None:
        for name in ("outputs", "notes"):
            if name in fields:
                fields[name] = json.dumps(fields[name])
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._locked() as db:
            db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", [*fields.values(), job_id])

    def reserve(self, owner: str, names: Sequence[str], taken: Callable[[str], bool]) -> bool:
        """Register the output ``names`` to ``owner`` in one transaction, unless one belongs to
        another owner or has none but ``taken(name)`` (a file nobody registered holds it).
        True when every name is now ``owner``'s. See :class:`hotfolder.naming.NameRegistry`."""
        marks = ", ".join("?" for _ in names)
        with self._locked() as db:
            db.execute("BEGIN IMMEDIATE")  # one writer at a time, across daemons too
            try:
                sql = f"SELECT path, owner FROM output_names WHERE path IN ({marks})"
                owners = dict(db.execute(sql, list(names)).fetchall())
                free = all(
                    owners[name] == owner if name in owners else not taken(name) for name in names
                )
                if free:
                    self._assign(db, owner, names)
            finally:
                db.execute("COMMIT")
        return free

    def assign(self, owner: str, names: Sequence[str]) -> None:
        """Register ``names`` to ``owner``, whoever had them."""
        with self._locked() as db:
            self._assign(db, owner, names)

    def unregister(self, owner: str, names: Sequence[str]) -> None:
        """Give up ``owner``'s claim to ``names`` (it published nothing under them)."""
        sql = "DELETE FROM output_names WHERE path = ? AND owner = ?"
        with self._locked() as db:
            db.executemany(sql, [(name, owner) for name in names])

    @staticmethod
    def _assign(db: sqlite3.Connection, owner: str, names: Sequence[str]) -> None:
        sql = "INSERT OR REPLACE INTO output_names (path, owner) VALUES (?, ?)"
        db.executemany(sql, [(name, owner) for name in names])

    def forget(self, job_id: str) -> None:
        """Drop the row of a claim that was put back untouched: it will be a new job."""
        with self._locked() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def recent(self, limit: int = 20, failed_only: bool = False) -> list[Row]:
        where = "WHERE outcome = 'failed'" if failed_only else ""
        sql = f"SELECT {', '.join(COLUMNS)} FROM jobs {where} ORDER BY claimed_at DESC LIMIT ?"
        with self._locked() as db:
            rows = db.execute(sql, (limit,)).fetchall()
        return [_row(values) for values in rows]

    def all(self) -> list[Row]:
        return self.recent(limit=-1)


def _row(values: tuple[Any, ...]) -> Row:
    record = dict(zip(COLUMNS, values, strict=True))
    record["outputs"] = json.loads(record["outputs"]) if record["outputs"] else []
    return Row(**record)


def format_rows(rows: list[Row]) -> str:
    """A table for people, newest first."""
    lines = [f"{'claimed':19}  {'inbox':12} {'outcome':8} {'batch':>5} {'ms':>7}  path / error"]
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.claimed_at or 0))
        took = ""
        if row.published_at and row.detected_at:
            took = f"{(row.published_at - row.detected_at) * 1000:.0f}"
        batch = "" if row.batch_size is None else str(row.batch_size)
        detail = row.path if row.outcome != "failed" else f"{row.path}: {row.reason}: {row.error}"
        lines.append(f"{when}  {row.inbox:12} {row.outcome:8} {batch:>5} {took:>7}  {detail}")
    return "\n".join(lines)
