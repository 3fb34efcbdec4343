"""The status page: what happened to the photos, with pictures, on the metrics listener.

Read-only by construction: every answer comes from a read-only connection to the journal, the
metrics registry, the pause state, or a thumbnail file named by a job id (see
:mod:`hotfolder.thumbnails`); nothing in a request becomes a path. Names are sent as the
journal's escaped text inside JSON and written into the page with ``textContent`` by
``static/app.js``, never parsed as HTML. Every query is bounded: pages of at most
:data:`MAX_LIMIT` rows through the journal's indexes, name searches over at most
:data:`SEARCH_WINDOW` of the newest jobs, and no scan of the outbox.

    GET /status                          the page (static/index.html, app.js, style.css)
    GET /status/api/inboxes              [{name, waiting, oldest_waiting_s, images_per_min,
                                           paused, paused_why, last_success}]
    GET /status/api/jobs?inbox=&outcome=&q=&before=&limit=
                                         {"jobs": [job...], "next": cursor or null}
    GET /status/api/jobs/<id>            job + {"outputs": [{name, size}], "row": {...}}
    GET /status/thumbs/<id>/<view>       image/jpeg (views: thumbnails.VIEWS)
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry

from hotfolder import names
from hotfolder.journal import COLUMNS
from hotfolder.thumbnails import JOB_ID, Thumbnails

PREFIX = "/status"
DEFAULT_LIMIT = 25
MAX_LIMIT = 100
SEARCH_WINDOW = 20_000  # newest jobs a name search looks through, per page
RATE_WINDOW = 300.0  # seconds of publications behind "images per minute"
OUTCOMES = ("success", "failed", "claimed")
STATIC = {  # the only files served, by request path
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
CURSOR = re.compile(r"(\d+(?:\.\d+)?)_([0-9a-f]{32})")
# Jobs published in the last RATE_WINDOW, by inbox. SQLite would rather walk the inbox index
# (every row) to group by inbox; the publication index reads only the window.
RATE_SQL = (
    "SELECT inbox, COUNT(*) FROM jobs INDEXED BY jobs_by_publication "
    "WHERE published_at >= ? GROUP BY inbox"
)
JSON_TYPE = "application/json"
MOVED = b'<!doctype html><meta http-equiv="refresh" content="0; url=status/">\n'

# (status, body, content type)
Response = tuple[int, bytes, str]
InboxStates = Callable[[], list[dict[str, Any]]]


class StatusPage:
    """Answers the requests under :data:`PREFIX`; ``inboxes`` gives the live state of each
    inbox (see :func:`inbox_states`)."""

    def __init__(self, journal: Path, thumbnails: Thumbnails, inboxes: InboxStates) -> None:
        self.journal = journal
        self.thumbnails = thumbnails
        self.inboxes = inboxes
        self.static = {
            path: (importlib.resources.files("hotfolder").joinpath("static", name).read_bytes(),
                   kind)
            for path, (name, kind) in STATIC.items()
        }  # fmt: skip

    def handle(self, target: str) -> Response | None:
        """The answer to ``GET target``; None when the path is not the status page's."""
        try:
            return self._route(target)
        except sqlite3.Error as exc:  # busy past the timeout, damaged: say so, not a reset
            return 503, f"the journal cannot be read: {exc}\n".encode(), "text/plain"

    def _route(self, target: str) -> Response | None:
        url = urlsplit(target)
        if url.path != PREFIX and not url.path.startswith(PREFIX + "/"):
            return None
        path = url.path[len(PREFIX) :]
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if path == "":  # the page's links are relative to /status/ (works behind a proxy)
            return 200, MOVED, "text/html; charset=utf-8"
        if path in self.static:
            return 200, *self.static[path]
        if path == "/api/inboxes":
            return _json(self.inbox_rows())
        if path == "/api/jobs":
            return self.jobs(query)
        parts = path.split("/")
        if len(parts) == 4 and parts[1:3] == ["api", "jobs"]:
            return self.job(parts[3])
        if len(parts) == 4 and parts[1] == "thumbs":
            return self.thumbnail(parts[2], parts[3])
        return 404, b"not found\n", "text/plain"

    # ----- endpoints ---------------------------------------------------------------------

    def inbox_rows(self) -> list[dict[str, Any]]:
        since = time.time() - RATE_WINDOW
        with self._db() as db:
            published = dict(db.execute(RATE_SQL, (since,)).fetchall()) if db else {}
        rows = self.inboxes()
        for row in rows:
            row["images_per_min"] = round(published.get(row["name"], 0) * 60 / RATE_WINDOW, 1)
        return rows

    def jobs(self, query: dict[str, str]) -> Response:
        try:
            limit = min(max(int(query.get("limit", DEFAULT_LIMIT)), 1), MAX_LIMIT)
        except ValueError:
            return 400, b"limit: expected a number\n", "text/plain"
        # Ignored, they would answer every job, or the first page again, as if applied.
        if query.get("outcome", OUTCOMES[0]) not in OUTCOMES:
            return 400, f"outcome: expected one of {', '.join(OUTCOMES)}\n".encode(), "text/plain"
        if "before" in query and not CURSOR.fullmatch(query["before"]):
            return 400, b"before: expected the next of an earlier page\n", "text/plain"
        sql, values = jobs_query(query)
        with self._db() as db:
            rows = db.execute(sql, [*values, limit + 1]).fetchall() if db else []
        jobs = [self._job(dict(zip(COLUMNS, r, strict=True))) for r in rows[:limit]]
        last = jobs[-1] if len(rows) > limit else None
        following = f"{last['claimed_at']!r}_{last['id']}" if last else None
        return _json({"jobs": jobs, "next": following})

    def job(self, job_id: str) -> Response:
        if not JOB_ID.fullmatch(job_id):
            return 404, b"no such job\n", "text/plain"
        sql = f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE id = ?"
        with self._db() as db:
            found = db.execute(sql, (job_id,)).fetchone() if db else None
        if found is None:
            return 404, b"no such job\n", "text/plain"
        row = dict(zip(COLUMNS, found, strict=True))
        outputs = json.loads(row["outputs"]) if row["outputs"] else []
        detail = self._job(row)
        detail["outputs"] = [{"name": name, "size": _size(name)} for name in outputs]
        detail["row"] = {**row, "outputs": outputs}
        return _json(detail)

    def thumbnail(self, job_id: str, view: str) -> Response:
        path = self.thumbnails.path(job_id, view)
        if path is None:
            return 404, b"no such picture\n", "text/plain"
        try:
            return 200, path.read_bytes(), "image/jpeg"
        except OSError:
            return 404, b"no such picture\n", "text/plain"

    # ----- helpers -----------------------------------------------------------------------

    def _job(self, row: dict[str, Any]) -> dict[str, Any]:
        """The fields a list shows, for one journal row."""
        latency = None
        if row["published_at"] and row["detected_at"]:
            latency = round(row["published_at"] - row["detected_at"], 3)
        small = self.thumbnails.path(row["id"], "before")
        return {
            "id": row["id"], "inbox": row["inbox"], "path": row["path"],
            "size": row["size"], "outcome": row["outcome"], "reason": row["reason"],
            "error": row["error"], "claimed_at": row["claimed_at"],
            "published_at": row["published_at"], "latency_s": latency,
            "batch_size": row["batch_size"], "device": row["device"],
            "attempts": row["attempts"], "host": row["host"],
            "thumbnails": small is not None and small.exists(),
        }  # fmt: skip

    @contextlib.contextmanager
    def _db(self) -> Any:
        """A read-only connection for one request (None while no journal exists yet)."""
        if not self.journal.exists():
            yield None
            return
        db = sqlite3.connect(f"{self.journal.as_uri()}?mode=ro", uri=True, timeout=10)
        try:
            yield db
        finally:
            db.close()


def jobs_query(query: dict[str, str]) -> tuple[str, list[object]]:
    """The SQL of one page of jobs for the filters in ``query`` (inbox, outcome, q, before),
    newest first, and its values but the last: how many rows to return."""
    where: list[str] = []
    values: list[object] = []
    if query.get("inbox"):
        where.append("inbox = ?")
        values.append(query["inbox"])
    if query.get("outcome") in OUTCOMES:
        where.append("outcome = ?")
        values.append(query["outcome"])
    cursor = CURSOR.fullmatch(query.get("before", ""))
    if cursor:
        where.append("(claimed_at, id) < (?, ?)")
        values += [float(cursor.group(1)), cursor.group(2)]
    source = "jobs"
    if query.get("q"):
        # Newest first within a bounded window: a search that matches nothing never walks the
        # whole history.
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        source = f"(SELECT * FROM jobs {clause} ORDER BY claimed_at DESC LIMIT ?)"
        values.append(SEARCH_WINDOW)
        where = ["instr(lower(path), lower(?)) > 0"]
        values.append(query["q"])
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    sql = (f"SELECT {', '.join(COLUMNS)} FROM {source} {clause} "
           "ORDER BY claimed_at DESC, id DESC LIMIT ?")  # fmt: skip
    return sql, values


def _json(value: object) -> Response:
    return 200, json.dumps(value).encode(), JSON_TYPE


def _size(escaped: str) -> int | None:
    """Bytes of a published output named in the journal (None when it is gone)."""
    try:
        return os.lstat(names.unescape(escaped)).st_size
    except (OSError, ValueError):
        return None


def inbox_states(
    inbox_names: Callable[[], list[str]],
    registry: CollectorRegistry,
    pause_reasons: Callable[[], set[str]],
) -> InboxStates:
    """Each inbox's backlog, oldest waiting file and last success as the metrics have them,
    and the intake's pause (which holds every inbox)."""

    def sample(name: str, inbox: str) -> float:
        return registry.get_sample_value(name, {"inbox": inbox}) or 0.0

    def states() -> list[dict[str, Any]]:
        why = sorted(pause_reasons())
        return [
            {
                "name": inbox,
                "waiting": int(sample("hotfolder_pending_files", inbox)),
                "oldest_waiting_s": sample("hotfolder_oldest_pending_age_seconds", inbox),
                "paused": bool(why),
                "paused_why": why,
                "last_success": sample("hotfolder_last_success_timestamp_seconds", inbox) or None,
            }
            for inbox in inbox_names()
        ]

    return states
