"""The publish stage: a picture and its alpha matte become the inbox's outputs in the outbox,
then (only then) the original is archived; or the file goes to errors/ with the reason; or,
when the outbox or archive cannot be written, the file goes back and intake pauses."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import time
from pathlib import PurePosixPath

from hotfolder import names, naming, publish, recipes
from hotfolder.claims import ENCODE, Claim
from hotfolder.collect import Stop
from hotfolder.inboxes import Inbox
from hotfolder.jobs import ImageError, Reason
from hotfolder.outcomes import Outcomes, decide, file_original
from hotfolder.pipeline import QUEUE_POLL, SPACE_MARGIN, Inferred, Pipeline
from hotfolder.thumbnails import Thumbnails

log = logging.getLogger(__name__)


class Publish:
    """One of the publish pool's threads runs ``step`` in a loop."""

    def __init__(
        self, pipeline: Pipeline, outcomes: Outcomes, thumbnails: Thumbnails | None = None
    ) -> None:
        self.pipeline = pipeline
        self.outcomes = outcomes
        self.thumbnails = thumbnails  # for the status page, when it is served

    def step(self) -> bool:
        """Publish one inferred file; False at the stop sentinel."""
        try:
            item = self.pipeline.inferred.get(timeout=QUEUE_POLL)
        except queue.Empty:
            return True
        if isinstance(item, Stop):
            return False
        self.publish(item)
        return True

    def publish(self, item: Inferred) -> None:
        """Encode the outputs, publish them, archive the original; or file it in errors/, or
        pause when the outbox or archive cannot be written (other OSErrors propagate)."""
        decoded = item.decoded
        inbox, claim = decoded.inbox, decoded.claim
        if self.pipeline.pause.active:  # not even encoded: it goes back, for after the pause
            self.outcomes.release(inbox, claim)
            return
        inbox.claims.note(ENCODE, [claim])
        inference = {"inferred_at": item.inferred_at, "batch_size": item.batch_size,
                     "device": str(self.pipeline.engine.device)}  # fmt: skip
        started = time.monotonic()
        lowered: dict[str, int] = {}  # output → the quality max_bytes made it take
        try:
            picture, alpha = decoded.picture, item.alpha
            rendered = recipes.render_all(inbox.config.outputs, picture, alpha, lowered)
        except (ValueError, ImageError) as exc:
            reason = exc.reason if isinstance(exc, ImageError) else Reason.ENCODE
            message = f"cannot encode outputs: {exc}"
            self.outcomes.reject(inbox, claim, reason, message, inference)
            return
        encoded = time.monotonic()
        self.pipeline.metrics.stage.labels("encode").observe(encoded - started)
        files: list[tuple[PurePosixPath, bytes]] = []
        try:
            files = list(zip(self.output_names(inbox, claim), rendered, strict=True))
            claim = self.archive(inbox, claim, files)
        except naming.NameCollisionError as exc:
            self.outcomes.reject(inbox, claim, Reason.NAME_COLLISION, str(exc), inference)
            return
        except publish.UnsafePathError as exc:
            self.release_names(inbox, claim, files)
            message = f"not published: {exc}"
            self.outcomes.reject(inbox, claim, Reason.UNSAFE_PATH, message, inference)
            return
        except publish.NameTakenError as exc:
            self.release_names(inbox, claim, files)
            message = f"not published: {exc}"
            self.outcomes.reject(inbox, claim, Reason.NAME_COLLISION, message, inference)
            return
        except OSError as exc:
            need = SPACE_MARGIN * (sum(len(data) for data in rendered) + claim.size)
            self.release_names(inbox, claim, files)
            if not self.outcomes.cannot_continue(inbox, claim, exc, need):
                raise
            return
        published = time.monotonic()
        self.pipeline.metrics.stage.labels("publish").observe(published - encoded)
        timings = {
            "decode": decoded.decode_seconds, "queue": item.queue_seconds,
            "inference": item.inference_seconds, "encode": encoded - started,
            "publish": published - encoded,
        }  # fmt: skip
        outputs = [names.escape(str(inbox.config.outbox / path)) for path, _ in files]
        record = {**inference, "attempts": claim.attempts, "sha256": decoded.sha256,
                  "outputs": outputs}  # fmt: skip
        if lowered:
            record["notes"] = {"quality": lowered}
        if self.thumbnails is not None:  # before the journal says success: the page shows both
            self.thumbnails.save(claim.job_id, picture, item.alpha)
        self.outcomes.close_archived(inbox, claim, record, timings, item.batch_size)

    def output_names(self, inbox: Inbox, claim: Claim) -> list[PurePosixPath]:
        """Output paths (relative to the outbox) no other input owns, by the inbox's policy."""
        cfg = inbox.config
        owner = f"{cfg.name}:{names.escape(claim.relative)}"

        def key(path: PurePosixPath) -> str:
            return names.escape(str(cfg.outbox / path))

        def taken(escaped: str) -> bool:
            return os.path.lexists(names.unescape(escaped))

        journal = self.pipeline.journal
        return naming.choose(cfg.outputs, claim.relative, cfg.collisions, owner, journal, key,
                             taken)  # fmt: skip

    def release_names(
        self, inbox: Inbox, claim: Claim, files: list[tuple[PurePosixPath, bytes]]
    ) -> None:
        """Not published after all: the output names this job registered and no file holds go
        back to whoever comes next."""
        cfg = inbox.config
        owner = f"{cfg.name}:{names.escape(claim.relative)}"
        unused = [cfg.outbox / path for path, _ in files if not os.path.lexists(cfg.outbox / path)]
        self.pipeline.journal.unregister(owner, [names.escape(str(p)) for p in unused])

    @staticmethod
    def archive(inbox: Inbox, claim: Claim, files: list[tuple[PurePosixPath, bytes]]) -> Claim:
        """Outputs into the outbox, then (only then) the original out of the work folder."""
        cfg = inbox.config
        publish.place_outputs(files, cfg.outbox, claim.folder / "outputs", cfg.permissions)
        claim = decide(inbox, claim, "success")
        try:
            file_original(cfg, claim)
        except OSError:
            # The original did not move: its record must not say the job succeeded, or a later
            # start would journal a success whose original never reached done/.
            with contextlib.suppress(OSError):
                inbox.claims.record_outcome(claim, "")
            raise
        return claim
