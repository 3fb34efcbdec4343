"""What the stages of a running daemon share: the queues between them, the count of files in
flight, the pause of intake, the stop flags; and the values they hand each other.

    intake (watch + claim) ─▶ claims ─▶ decode pool ─▶ decoded ─▶ infer (batches)
        ─▶ inferred ─▶ publish pool ─▶ outbox/ + done/ | errors/

Every queue is bounded, so a backlog of 100 000 files stays in the inbox, not in memory: the
intake claims a file only when the claim queue has room. One :class:`Pipeline` is built by the
service and handed to every stage; stages never import the service.
"""

from __future__ import annotations

import errno
import logging
import queue
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hotfolder import config, imaging
from hotfolder.claims import Claim
from hotfolder.collect import Stop
from hotfolder.inboxes import Inbox, InboxSet
from hotfolder.journal import Journal
from hotfolder.metrics import Metrics
from hotfolder.progress import Progress
from hotfolder.roots import Pause, Root, Roots, usable
from hotfolder.runtime import Engine

log = logging.getLogger(__name__)

QUEUE_POLL = 1.0  # a stage waiting for work still steps this often (it proves it is alive)
PROBE_SECONDS = 1.0  # while paused, each folder that failed is probed this often
# Free space a folder that ran out must offer again, as a multiple of what the failed job needed:
# resuming with room for exactly one job would fail the next one and pause again.
SPACE_MARGIN = 2
# Errors that say the machine, not the file, is in trouble: stop intake, keep the file.
PAUSE_REASONS = {
    errno.ENOSPC: "disk_full",
    errno.EDQUOT: "disk_full",
    errno.EROFS: "read_only",
    errno.EACCES: "read_only",
    errno.EPERM: "read_only",
    errno.EIO: "io_error",
    errno.ENOTCONN: "io_error",
    errno.ESTALE: "io_error",
}


@dataclass(frozen=True)
class Decoded:
    """A claimed file's picture, on its way to the model."""

    inbox: Inbox
    claim: Claim
    picture: imaging.Picture
    sha256: str
    decode_seconds: float
    decoded_at: float  # monotonic


@dataclass(frozen=True)
class Inferred:
    """A picture with its alpha matte (H, W) uint8, on its way to the outbox."""

    decoded: Decoded
    alpha: np.ndarray
    batch_size: int
    queue_seconds: float
    inference_seconds: float
    inferred_at: float  # wall clock, for the journal


class Pipeline:
    """State shared by the stages of one daemon. Thread-safe where stages share it: the queues
    are, the in-flight count has its lock, flags are Events; the rest belongs to one stage."""

    def __init__(
        self,
        cfg: config.Config,
        engine: Engine,
        metrics: Metrics,
        journal: Journal,
        inboxes: InboxSet,
        once: bool,
    ) -> None:
        self.config = cfg  # replaced as a whole by a reload (intake)
        self.engine = engine
        self.metrics = metrics
        self.journal = journal
        self.inboxes = inboxes
        self.once = once
        self.host = socket.gethostname()
        batch = cfg.batching.max_batch_size
        self.claims: queue.Queue[tuple[Inbox, Claim] | Stop] = queue.Queue(batch)
        self.decoded: queue.Queue[Decoded | Stop] = queue.Queue(2 * batch)
        self.inferred: queue.Queue[Inferred | Stop] = queue.Queue(2 * batch)
        self.recovered: deque[tuple[Inbox, Claim]] = deque()  # adopted jobs, first in line
        self.suspects: deque[tuple[Inbox, Claim]] = deque()  # retried alone, before the rest
        self.stopping = threading.Event()  # stop taking new work
        self.stop_requested = threading.Event()  # set by signals, or when --once is done
        self.reload_requested = threading.Event()
        self.pause = Pause(PROBE_SECONDS)  # intake claims nothing while it is active
        self.roots: dict[tuple[Path, ...], Roots] = {}
        # Jobs whose inbox went away (share dropped, folder deleted): neither finished nor put
        # back, until the inbox is reachable again.
        self.parked: list[tuple[Inbox, Claim]] = []
        self.parked_lock = threading.Lock()
        self._lock = threading.Lock()
        self.in_flight = 0
        self.failed_files = 0  # this run's, for the exit code of --once
        self.blocked = False  # --once stopped because intake was paused
        self.progress = Progress()  # files found and finished, shown by --once

    def count(self, delta: int) -> None:
        """One more (or fewer) file between claim and archive."""
        with self._lock:
            self.in_flight += delta
            self.metrics.in_flight.set(self.in_flight)

    def count_failure(self) -> None:
        with self._lock:
            self.failed_files += 1

    def busy(self) -> int:
        with self._lock:
            return self.in_flight

    def paused(self) -> bool:
        return self.pause.active

    # ----- the folders an inbox works in ------------------------------------------------

    def roots_of(self, cfg: config.InboxConfig) -> Roots:
        """The folders of an inbox, as they were when first seen with these paths."""
        folders = tuple(f for f in (cfg.path, cfg.outbox, cfg.done, cfg.errors) if f is not None)
        if folders not in self.roots:
            self.roots[folders] = Roots(folders)
        return self.roots[folders]

    def inbox_away(self, inbox: Inbox) -> bool:
        return any(r.path == inbox.config.path for r in self.roots_of(inbox.config).away())

    def hold(self, root: Root, reason: str, now: float, need: int, why: object) -> None:
        """Keep intake paused until ``root`` can be written again (with ``need`` bytes free)."""
        if self.pause.hold(root, reason, now, need):
            log.error("intake paused (%s): %s: %s; probing it every %.0f s until it can be "
                      "written", reason, root.path, why, PROBE_SECONDS)  # fmt: skip

    def hold_failing(self, cfg: config.InboxConfig, reason: str, need: int, why: object) -> None:
        """Pause until every root of the inbox that fails a probe now passes one (all of
        them, if none fails now: the trouble was fleeting, one probe round confirms it)."""
        now = time.monotonic()
        every = self.roots_of(cfg).roots
        for root in [r for r in every if not usable(r, need)] or every:
            self.hold(root, reason, now, need, why)
