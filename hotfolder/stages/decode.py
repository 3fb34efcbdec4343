"""The decode stage: a claimed file's bytes become a picture, or the file goes to errors/."""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import time

from hotfolder import imaging, names, recipes
from hotfolder.claims import DECODE, DECODED, Claim
from hotfolder.collect import Stop
from hotfolder.inboxes import Inbox
from hotfolder.jobs import ImageError, Reason
from hotfolder.outcomes import Outcomes
from hotfolder.pipeline import QUEUE_POLL, Decoded, Pipeline

log = logging.getLogger(__name__)


class Decode:
    """One of the decode pool's threads runs ``step`` in a loop."""

    def __init__(self, pipeline: Pipeline, outcomes: Outcomes) -> None:
        self.pipeline = pipeline
        self.outcomes = outcomes

    def step(self) -> bool:
        """Decode one claimed file and hand it to the model; False at the stop sentinel."""
        pipeline = self.pipeline
        try:
            item = pipeline.claims.get(timeout=QUEUE_POLL)
        except queue.Empty:
            return True
        if isinstance(item, Stop):
            return False
        inbox, claim = item
        if pipeline.stopping.is_set() or pipeline.pause.active:  # paused: decode nothing
            self.outcomes.release(inbox, claim)
            return True
        decoded = self.decode(inbox, claim)
        if decoded is None:
            return True
        while not pipeline.stopping.is_set() and not pipeline.pause.active:
            try:
                pipeline.decoded.put(decoded, timeout=0.2)
                return True
            except queue.Full:
                continue
        self.outcomes.release(inbox, claim)
        return True

    def decode(self, inbox: Inbox, claim: Claim) -> Decoded | None:
        """The claimed file's picture; None when the file was sent to errors/."""
        limits = self.pipeline.config.limits
        claim = inbox.claims.record_attempt(claim)
        inbox.claims.note(DECODE, [claim])
        started = time.monotonic()
        try:
            data = imaging.read_file(claim.source, limits.max_bytes)
            if (unfinished := imaging.looks_incomplete(data)) is not None:
                raise unfinished
            keep_source = recipes.wants_source(inbox.config.outputs)
            picture = imaging.decode(data, limits.max_pixels, keep_source)
        except ImageError as exc:
            if not self.still_arriving(inbox, claim, exc):
                self.outcomes.reject(inbox, claim, exc.reason, exc.message)
            return None
        except OSError as exc:  # the inbox's share dropped, a disk error
            if not self.outcomes.cannot_continue(inbox, claim, exc):
                raise
            return None
        if self.still_arriving(inbox, claim):
            return None
        inbox.claims.note(DECODED, [claim])
        decoded_at = time.monotonic()
        digest = hashlib.sha256(data).hexdigest()
        decoded = Decoded(inbox, claim, picture, digest, decoded_at - started, decoded_at)
        self.pipeline.metrics.stage.labels("decode").observe(decoded.decode_seconds)
        return decoded

    def still_arriving(self, inbox: Inbox, claim: Claim, error: ImageError | None = None) -> bool:
        """A writer may still be filling the claimed file: it changed since the claim, or it
        looks cut short (``error`` says empty or corrupt) and has not yet been unchanged for
        the inbox's ``incomplete_grace_ms``. Then it goes back to the inbox to wait (True)."""
        try:
            info = os.lstat(claim.source)
        except OSError:
            return False
        state = (info.st_size, info.st_mtime_ns)
        changed = claim.mtime_ns != 0 and state != (claim.size, claim.mtime_ns)
        cut_short = error is not None and error.reason in (Reason.EMPTY, Reason.CORRUPT)
        if not changed and not (
            cut_short and inbox.watcher.still_arriving(claim.relative, *state, time.monotonic())
        ):
            return False
        why = "it changed since it was taken" if changed else f"it {error and error.message}"
        log.info("%s/%s: put back to wait for its writer: %s", inbox.config.name,
                 names.escape(claim.relative), why)  # fmt: skip
        self.outcomes.release(inbox, claim)
        return True
