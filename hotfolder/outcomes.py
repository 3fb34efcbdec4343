"""How a job ends, whichever stage ends it: back to the inbox untouched, into errors/ with a
reason, or archived after its outputs were published; and the journal row and metrics of each.

This module sits below the stages (every stage ends jobs through it) and above the file and
claim modules, so that no stage needs another, and none needs the service.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hotfolder import __version__, config, names, publish, roots
from hotfolder.claims import Claim
from hotfolder.inboxes import Inbox
from hotfolder.jobs import Reason
from hotfolder.pipeline import PAUSE_REASONS, Pipeline

log = logging.getLogger(__name__)


class Outcomes:
    """Ends jobs for the stages of one pipeline."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def begin(self, claim: Claim) -> None:
        """A claimed (or adopted) job: one more file in flight, and its journal row."""
        self.pipeline.count(+1)
        self.pipeline.journal.begin(
            claim.job_id, inbox=claim.inbox, path=names.escape(claim.relative), size=claim.size,
            detected_at=claim.detected_at, claimed_at=claim.claimed_at,
            attempts=claim.attempts, outcome="claimed", host=self.pipeline.host,
        )  # fmt: skip

    def release(self, inbox: Inbox, claim: Claim) -> None:
        """Put an unfinished job's file back in the inbox, as if it had never been taken; or
        keep it aside while its inbox is away (putting it back would create folders in a bare
        mountpoint)."""
        if self.pipeline.inbox_away(inbox):
            self.park(inbox, claim)
            return
        if claim.solo:
            # Back in the inbox it would be taken in a batch with good photos and lose its
            # crash count; its job folder keeps both until the next start retries it alone.
            log.warning("%s/%s: kept in its work folder for the next start, which retries it "
                        "alone (it was in work when a daemon stopped)", inbox.config.name,
                        names.escape(claim.relative))  # fmt: skip
            self.pipeline.count(-1)
            return
        try:
            released = inbox.claims.release(claim)
        except OSError as exc:
            if not claim.folder.is_dir():
                self.drop(inbox, claim, exc)
                return
            log.error("%s/%s: cannot be put back (%s)", inbox.config.name,
                      names.escape(claim.relative), exc)  # fmt: skip
            self.park(inbox, claim)
            return
        if released:
            self.pipeline.journal.forget(claim.job_id)
        else:
            log.warning("%s/%s: a new file took its name; kept for the next start",
                        inbox.config.name, names.escape(claim.relative))  # fmt: skip
        self.pipeline.count(-1)

    def cannot_continue(self, inbox: Inbox, claim: Claim, exc: OSError, need: int = 0) -> bool:
        """A job failed on disk: set it aside and pause intake if the machine, not the file, is
        at fault. ``need``: bytes the job needed. False if ``exc`` is none of those troubles
        (the caller re-raises it)."""
        pipeline = self.pipeline
        away = pipeline.roots_of(inbox.config).away()
        if away:
            now = time.monotonic()
            for root in away:
                pipeline.hold(root, roots.AWAY, now, 0, exc)
            self.release(inbox, claim)  # parked instead while the inbox itself is away
            return True
        if not claim.folder.is_dir():
            self.drop(inbox, claim, exc)
            return True
        reason = PAUSE_REASONS.get(exc.errno or 0)
        if reason is None:
            return False
        log.error("%s/%s: cannot be finished (%s); the file goes back to the inbox",
                  inbox.config.name, names.escape(claim.relative), exc)  # fmt: skip
        pipeline.hold_failing(inbox.config, reason, need, exc)
        self.release(inbox, claim)
        return True

    def drop(self, inbox: Inbox, claim: Claim, exc: OSError) -> None:
        """The job's folder vanished with its file (the inbox was deleted or replaced): there
        is nothing left to finish or put back."""
        log.warning("%s/%s: its work folder vanished with the file (inbox deleted?); the job "
                    "is dropped: %s", inbox.config.name, names.escape(claim.relative),
                    exc)  # fmt: skip
        self.pipeline.journal.forget(claim.job_id)
        self.pipeline.count(-1)

    def park(self, inbox: Inbox, claim: Claim) -> None:
        """The job's inbox is unreachable: neither finish it nor put it back; wait for it
        (the intake takes it up again when every folder is back)."""
        log.warning("%s/%s: its inbox is unreachable; the job waits for it", inbox.config.name,
                    names.escape(claim.relative))  # fmt: skip
        self.pipeline.journal.forget(claim.job_id)  # not begun, as far as anyone can tell
        with self.pipeline.parked_lock:
            self.pipeline.parked.append((inbox, claim))
        self.pipeline.count(-1)

    def reject(
        self,
        inbox: Inbox,
        claim: Claim,
        reason: Reason,
        message: str,
        columns: dict[str, Any] | None = None,
    ) -> None:
        """Move the file to errors/ with a sidecar saying why; ``columns`` are more journal
        fields of the job."""
        cfg = inbox.config
        shown = names.escape(claim.relative)
        message = names.printable(message)  # it may quote an exception's raw file name
        log.warning(
            "%s/%s: failed: %s (%s)", cfg.name, shown, message, reason.value,
            extra={"inbox": cfg.name, "path": shown, "outcome": "failed",
                   "reason": reason.value, "attempts": claim.attempts, "job": claim.job_id},
        )  # fmt: skip
        report: dict[str, object] = {
            "file": shown,
            "inbox": cfg.name,
            "reason": reason.value,
            "message": f"{names.escape(claim.name)} {message}",
            "attempts": claim.attempts,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": self.pipeline.host,
            "version": __version__,
            "job": claim.job_id,
        }
        try:
            claim = decide(inbox, claim, "failed")
            publish.write_error_report(cfg.errors, claim.archived_as, claim.job_id[:8], report,
                                       cfg.permissions)  # fmt: skip
            file_original(cfg, claim)
        except OSError as exc:
            if isinstance(exc, publish.RefusedPathError):
                raise
            if claim.outcome and os.path.lexists(claim.source):
                # Not filed after all: a later start must not file it without its report.
                with contextlib.suppress(OSError):
                    claim = inbox.claims.record_outcome(claim, "")
            if not self.cannot_continue(inbox, claim, exc):
                raise
            return
        self.pipeline.metrics.failures.labels(cfg.name, reason.value).inc()
        record = {**(columns or {}), "reason": reason.value, "error": message,
                  "attempts": claim.attempts}  # fmt: skip
        self.close_archived(inbox, claim, record)

    def close_archived(
        self,
        inbox: Inbox,
        claim: Claim,
        record: dict[str, Any] | None = None,
        timings: dict[str, float] | None = None,
        batch_size: int = 0,
    ) -> None:
        """The original has left the work folder: record how the job ended (one journal write,
        with ``record``'s columns) and forget it."""
        name = inbox.config.name
        metrics, journal = self.pipeline.metrics, self.pipeline.journal
        shown = names.escape(claim.relative)
        record = record or {}
        if claim.outcome == "success":
            now = time.time()
            latency = now - claim.detected_at
            journal.update(claim.job_id, outcome="success", published_at=now, **record)
            metrics.processed.labels(name, "success").inc()
            metrics.latency.labels(name).observe(latency)
            metrics.last_success.labels(name).set(now)
            stages = {k: round(v * 1000) for k, v in (timings or {}).items()}
            detail = ", ".join(f"{k} {v}" for k, v in stages.items())
            log.info(
                "%s/%s: success in %.0f ms (%s ms; batch of %d)", name, shown,
                latency * 1000, detail, batch_size,
                extra={"inbox": name, "path": shown, "outcome": "success",
                       "latency_ms": round(latency * 1000), "stages_ms": stages,
                       "batch_size": batch_size, "job": claim.job_id},
            )  # fmt: skip
        else:
            journal.update(claim.job_id, outcome="failed", **record)
            metrics.processed.labels(name, "failed").inc()
            self.pipeline.count_failure()
        inbox.claims.finish(claim)
        self.pipeline.progress.advance()
        self.pipeline.count(-1)


def decide(inbox: Inbox, claim: Claim, outcome: str) -> Claim:
    """Record how the job ends and the name its original will have in done/ or errors/ (the
    job's own, or job-tagged when taken; at the top of the folder when the job's subfolder
    there is a link or a file), before anything moves: a daemon that dies now is followed by
    one that finishes the same move."""
    cfg = inbox.config
    root = original_destination(cfg, outcome)
    if root is None:
        return inbox.claims.record_outcome(claim, outcome)
    tag, report = claim.job_id[:8], outcome == "failed"
    try:
        name = publish.archive_name(root, claim.relative, tag, report, cfg.permissions)
    except publish.RefusedPathError as exc:
        log.error("%s; %s goes to the top of %s instead", exc, names.escape(claim.name), root)
        name = publish.archive_name(root, claim.name, tag, report, cfg.permissions)
    return inbox.claims.record_outcome(claim, outcome, name.as_posix())


def file_original(cfg: config.InboxConfig, claim: Claim) -> None:
    """Move the original out of the work folder to where its recorded outcome sends it."""
    destination = original_destination(cfg, claim.outcome)
    if destination is None:
        os.unlink(claim.source)
        return
    tag = claim.job_id[:8]
    target = claim.archived_as or claim.relative  # a job recorded before names were decided
    try:
        publish.archive(claim.source, destination, target, tag, cfg.permissions)
    except publish.RefusedPathError as exc:
        # A link (or a file) where its subfolder should be: the top of the folder, never the link.
        log.error("%s; %s goes to %s instead", exc, names.escape(claim.name), destination)
        publish.archive(claim.source, destination, claim.name, tag, cfg.permissions)


def original_destination(cfg: config.InboxConfig, outcome: str) -> Path | None:
    """The folder the original of a finished job goes to: errors/ when it failed, done/ when it
    succeeded (None: originals are deleted)."""
    return cfg.done if outcome == "success" else cfg.errors
