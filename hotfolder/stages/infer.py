"""The infer stage: decoded pictures in batches through the resident model.

A batch that fails is retried file by file, so one bad file never fails its batch-mates; if the
model then fails on a blank image too, the device is at fault: the files go back to the inbox
untouched and the stage stops (the process exits 1 and systemd restarts it).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import time

import numpy as np

from hotfolder.claims import INFERRED, MODEL, Claim
from hotfolder.collect import Stop, collect
from hotfolder.inboxes import Inbox
from hotfolder.jobs import Reason
from hotfolder.outcomes import Outcomes
from hotfolder.pipeline import Decoded, Inferred, Pipeline

log = logging.getLogger(__name__)

# Fault injection for tests and drills: a file whose path contains this variable's text kills
# the process with SIGKILL when it enters the model, as a GPU fault or a driver bug would.
KILL_IN_MODEL_ENV = "HOTFOLDER_FAULT_KILL_IN_MODEL"
COLLECT_POLL = 0.2  # seconds: how often a stage waiting for a first file still steps


class Infer:
    """The engine thread runs ``step`` in a loop."""

    def __init__(self, pipeline: Pipeline, outcomes: Outcomes) -> None:
        self.pipeline = pipeline
        self.outcomes = outcomes
        self.kill_marker = os.environ.get(KILL_IN_MODEL_ENV, "")

    def step(self) -> bool:
        """Collect one batch and run it; False at the stop sentinel."""
        pipeline = self.pipeline
        batching = pipeline.config.batching
        batch, stopped = collect(
            pipeline.decoded, batching.max_batch_size, batching.max_wait_ms / 1000, COLLECT_POLL
        )
        if pipeline.stopping.is_set():
            # Only the batch already in the model is finished; the rest goes back.
            for decoded in batch:
                self.outcomes.release(decoded.inbox, decoded.claim)
            stopped = self.release_waiting() or stopped
            return not stopped
        if pipeline.pause.active:  # nothing goes through the model that could not be published
            for decoded in batch:
                self.outcomes.release(decoded.inbox, decoded.claim)
            return not stopped
        for inferred in self.infer(batch):
            pipeline.inferred.put(inferred)
        return not stopped

    def infer(self, batch: list[Decoded]) -> list[Inferred]:
        """The batch through the model, with its metrics. The journal is written when each job
        ends, off this thread."""
        if not batch:
            return []
        metrics = self.pipeline.metrics
        note(MODEL, batch)
        if self.kill_marker and any(self.kill_marker in d.claim.relative for d in batch):
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection: see KILL_IN_MODEL_ENV
        started = time.monotonic()
        pairs, sizes = self.predict(batch)
        took = time.monotonic() - started
        note(INFERRED, batch)
        metrics.stage.labels("inference").observe(took)
        metrics.batch_size.observe(len(batch))
        metrics.executions.inc()
        metrics.inferences.inc(len(batch))
        now = time.time()
        results = []
        for (decoded, alpha), size in zip(pairs, sizes, strict=True):
            waited = started - decoded.decoded_at
            metrics.stage.labels("queue").observe(waited)
            results.append(Inferred(decoded, alpha, size, waited, took, now))
        return results

    def predict(self, batch: list[Decoded]) -> tuple[list[tuple[Decoded, np.ndarray]], list[int]]:
        """(file, alpha) pairs and the batch size each ran in. If the batch fails, each file
        runs alone; files that fail alone go to errors/, unless the model fails its self-check
        too (RuntimeError, after their files went back to the inbox)."""
        engine = self.pipeline.engine
        try:
            alphas = engine.predict([d.picture.rgb for d in batch])
            return list(zip(batch, alphas, strict=True)), [len(batch)] * len(batch)
        except Exception as exc:
            log.warning("batch of %d failed (%s); retrying its files one by one", len(batch), exc)
        pairs, failed = [], []
        for decoded in batch:
            try:
                pairs.append((decoded, engine.predict([decoded.picture.rgb])[0]))
            except Exception as exc:
                failed.append((decoded, exc))
        if failed and not self.engine_works():
            for decoded, _ in failed:
                self.outcomes.release(decoded.inbox, decoded.claim)
            raise RuntimeError("the model fails on a blank image too") from failed[0][1]
        for decoded, error in failed:
            message = f"inference failed: {error}"
            self.outcomes.reject(decoded.inbox, decoded.claim, Reason.INFERENCE, message)
        return pairs, [1] * len(pairs)

    def engine_works(self) -> bool:
        try:
            self.pipeline.engine.predict([np.zeros((32, 32, 3), np.uint8)])
        except Exception:
            log.exception("model self-check failed")
            return False
        return True

    def release_waiting(self) -> bool:
        """Stopping: decoded files that no batch took yet go back to their inbox. True if the
        stop sentinel was among them."""
        while True:
            try:
                item = self.pipeline.decoded.get_nowait()
            except queue.Empty:
                return False
            if isinstance(item, Stop):
                return True
            self.outcomes.release(item.inbox, item.claim)


def note(phase: str, batch: list[Decoded]) -> None:
    """The batch's phase in each inbox's activity log (a batch may mix inboxes)."""
    by_inbox: dict[int, tuple[Inbox, list[Claim]]] = {}
    for decoded in batch:
        by_inbox.setdefault(id(decoded.inbox), (decoded.inbox, []))[1].append(decoded.claim)
    for inbox, claims in by_inbox.values():
        inbox.claims.note(phase, claims)
