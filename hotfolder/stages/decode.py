"""The decode stage: a claimed file's bytes become a picture, or the file goes to errors/."""

from __future__ import annotations

import hashlib
import queue
import time

from hotfolder import imaging
from hotfolder.claims import DECODE, DECODED, Claim
from hotfolder.collect import Stop
from hotfolder.inboxes import Inbox
from hotfolder.jobs import ImageError
from hotfolder.outcomes import Outcomes
from hotfolder.pipeline import QUEUE_POLL, Decoded, Pipeline


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
        if pipeline.stopping.is_set():
            self.outcomes.release(inbox, claim)
            return True
        decoded = self.decode(inbox, claim)
        if decoded is None:
            return True
        while not pipeline.stopping.is_set():
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
            picture = imaging.decode(data, limits.max_pixels)
        except ImageError as exc:
            self.outcomes.reject(inbox, claim, exc.reason, exc.message)
            return None
        inbox.claims.note(DECODED, [claim])
        decoded_at = time.monotonic()
        digest = hashlib.sha256(data).hexdigest()
        decoded = Decoded(inbox, claim, picture, digest, decoded_at - started, decoded_at)
        self.pipeline.metrics.stage.labels("decode").observe(decoded.decode_seconds)
        return decoded
