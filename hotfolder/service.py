"""The daemon: stage threads joined by bounded queues, signals, graceful drain.

    intake (watch + claim) ─▶ claim queue ─▶ decode pool ─▶ decoded queue ─▶ engine (batches)
        ─▶ publish queue ─▶ publish pool ─▶ outbox/ + done/ | errors/

Every queue is bounded, so a backlog of 100 000 files stays in the inbox, not in memory: the
intake claims a file only when the claim queue has room. Each stage is one loop around a
``step``; a stage thread that dies stops the process with a non-zero exit code, so systemd
restarts it rather than leaving a zombie that accepts files. Signal handlers only set flags.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath
from types import FrameType
from typing import Any

import numpy as np

from hotfolder import __version__, imaging, publish, recipes
from hotfolder.claims import Claim, ClaimStore
from hotfolder.collect import STOP, Stop, collect
from hotfolder.config import Config, InboxConfig
from hotfolder.engine import MattingEngine
from hotfolder.jobs import ImageError, Reason
from hotfolder.journal import Journal
from hotfolder.watch import InboxWatcher, Ready

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED = 0, 1
# Errors that say the machine, not the file, is in trouble: stop intake, keep the file.
OPERATIONAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.ENOTCONN,
                      errno.ESTALE, errno.EACCES, errno.EPERM}  # fmt: skip
PAUSE_SECONDS = 10.0
INTAKE_TICK = 0.05
HEARTBEAT_SECONDS = 5.0


@dataclass(frozen=True)
class Decoded:
    inbox: Inbox
    claim: Claim
    picture: imaging.Picture
    sha256: str


@dataclass(frozen=True)
class Inferred:
    decoded: Decoded
    alpha: np.ndarray
    batch_size: int


class Inbox:
    """One configured inbox at run time: its watcher and its claims."""

    def __init__(self, config: InboxConfig, scan_interval: float, observe: bool) -> None:
        self.config = config
        self.watcher = InboxWatcher(config, scan_interval, observe=observe)
        self.claims = ClaimStore(config.name, config.path)

    def start(self) -> None:
        self.watcher.start()
        self.claims.open()

    def stop(self) -> None:
        self.watcher.stop()
        self.claims.close()


class Service:
    def __init__(
        self,
        config: Config,
        engine: MattingEngine,
        once: bool = False,
        notify: Callable[[str], None] = lambda state: None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.once = once
        self.notify = notify
        daemon = config.daemon
        batch = config.batching.max_batch_size
        self.workers = daemon.workers or os.cpu_count() or 2
        self.inboxes = [
            Inbox(c, daemon.scan_interval_ms / 1000, observe=not once) for c in config.inboxes
        ]
        self.journal = Journal(config.journal)
        self.claim_queue: queue.Queue[tuple[Inbox, Claim] | Stop] = queue.Queue(batch)
        self.decoded_queue: queue.Queue[Decoded | Stop] = queue.Queue(2 * batch)
        self.publish_queue: queue.Queue[Inferred | Stop] = queue.Queue(2 * batch)
        self.ready: deque[tuple[Inbox, Ready]] = deque()
        self.recovered: deque[tuple[Inbox, Claim]] = deque()
        self.stopping = threading.Event()  # stop taking new work
        self.stop_requested = threading.Event()  # set by signals, or when --once is done
        self.fatal: BaseException | None = None
        self.in_flight = 0
        self.in_flight_lock = threading.Lock()
        self.paused_until = 0.0
        self.scanned_once = False
        self.threads: list[threading.Thread] = []
        self.host = socket.gethostname()

    # ----- lifecycle -------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until a signal (or, with --once, until the inboxes are empty), drain."""
        self._install_signal_handlers()
        for inbox in self.inboxes:
            inbox.start()
        self._recover()
        self._start_threads()
        self.notify("READY=1")
        log.info("hotfolder %s serving %d inbox(es)", __version__, len(self.inboxes))
        while not self.stop_requested.wait(0.2):
            if self.fatal is not None:
                break
        self.notify("STOPPING=1")
        drained = self._drain()
        self.journal.close()
        if self.fatal is not None:
            log.critical("stopped because a stage failed: %r", self.fatal)
            return EXIT_FAILED
        return EXIT_OK if drained else EXIT_FAILED

    def _install_signal_handlers(self) -> None:
        def request_stop(signum: int, frame: FrameType | None) -> None:
            self.stop_requested.set()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, request_stop)
            signal.signal(signal.SIGINT, request_stop)

    def _start_threads(self) -> None:
        stages: list[tuple[str, Callable[[], bool]]] = [("intake", self._intake_step)]
        stages += [(f"decode-{i}", self._decode_step) for i in range(self.workers)]
        stages += [("engine", self._engine_step)]
        stages += [(f"publish-{i}", self._publish_step) for i in range(self.workers)]
        for name, step in stages:
            thread = threading.Thread(target=self._loop, args=(name, step), name=name, daemon=True)
            thread.start()
            self.threads.append(thread)

    def _loop(self, name: str, step: Callable[[], bool]) -> None:
        """One loop, many steps: run ``step`` until it says the stage is finished."""
        try:
            while step():
                pass
        except BaseException as exc:
            log.exception("stage %s failed", name)
            self.fatal = exc
            self.stopping.set()
            self.stop_requested.set()

    def _drain(self) -> bool:
        """Stop intake, finish the in-flight batch, give unstarted claims back; within the
        configured timeout. False if something was still running at the deadline."""
        self.stopping.set()
        deadline = time.monotonic() + self.config.daemon.drain_timeout_ms / 1000
        # Upstream first: each stage's sentinels queue behind the work already handed to it.
        stages: list[tuple[str, queue.Queue[Any] | None]] = [
            ("intake", None),
            ("decode", self.claim_queue),
            ("engine", self.decoded_queue),
            ("publish", self.publish_queue),
        ]
        for stage, inbound in stages:
            threads = [t for t in self.threads if t.name.split("-")[0] == stage]
            for _ in threads:
                if inbound is not None:
                    with contextlib.suppress(queue.Full):
                        inbound.put(STOP, timeout=max(deadline - time.monotonic(), 0.01))
            for thread in threads:
                thread.join(max(deadline - time.monotonic(), 0))
        alive = [t.name for t in self.threads if t.is_alive()]
        if alive:
            log.error("drain timeout: still running: %s", ", ".join(alive))
            return False
        for inbox in self.inboxes:
            inbox.stop()
        log.info("stopped cleanly")
        return True

    def _recover(self) -> None:
        for inbox in self.inboxes:
            for claim in inbox.claims.recover():
                log.info("%s/%s: resuming a job left by a stopped daemon", inbox.config.name,
                         claim.relative)  # fmt: skip
                self._count(+1)
                self._begin(claim)
                if claim.outcome:
                    self._close_archived(inbox, claim)
                else:
                    self.recovered.append((inbox, claim))

    def _begin(self, claim: Claim) -> None:
        self.journal.begin(
            claim.job_id, inbox=claim.inbox, path=claim.relative, size=claim.size,
            detected_at=claim.detected_at, claimed_at=claim.claimed_at,
            attempts=claim.attempts, outcome="claimed", host=self.host,
        )  # fmt: skip

    def _count(self, delta: int) -> None:
        with self.in_flight_lock:
            self.in_flight += delta

    # ----- intake ----------------------------------------------------------------------

    def _intake_step(self) -> bool:
        if self.stopping.is_set():
            return False
        now = time.monotonic()
        for inbox in self.inboxes:
            for ready in inbox.watcher.step(now):
                self.ready.append((inbox, ready))
            if now - inbox.claims.heartbeat_at > HEARTBEAT_SECONDS:
                inbox.claims.heartbeat()
        self.scanned_once = True
        if now >= self.paused_until:
            self._feed_claims()
        if self.once and self._idle():
            self.stop_requested.set()
            return False
        time.sleep(INTAKE_TICK)
        return True

    def _feed_claims(self) -> None:
        while self.recovered and not self.claim_queue.full():
            self.claim_queue.put(self.recovered.popleft())
        while self.ready and not self.claim_queue.full():
            inbox, ready = self.ready.popleft()
            claim = inbox.claims.claim(ready.relative, ready.detected_at)
            inbox.watcher.done(ready.relative)
            if claim is None:
                continue  # gone, or another daemon took it
            self._count(+1)
            self._begin(claim)
            self.claim_queue.put((inbox, claim))

    def _idle(self) -> bool:
        with self.in_flight_lock:
            busy = self.in_flight
        pending = any(inbox.watcher.pending for inbox in self.inboxes)
        return (
            self.scanned_once and not busy and not pending and not self.ready and not self.recovered
        )

    # ----- decode ----------------------------------------------------------------------

    def _decode_step(self) -> bool:
        item = self.claim_queue.get()
        if isinstance(item, Stop):
            return False
        inbox, claim = item
        if self.stopping.is_set():
            self._release(inbox, claim)
            return True
        if claim.attempts >= self.config.daemon.max_attempts:
            self._reject(inbox, claim, Reason.REPEATED_FAILURE,
                         f"failed or stopped the daemon {claim.attempts} times")  # fmt: skip
            return True
        claim = inbox.claims.record_attempt(claim)
        self.journal.update(claim.job_id, attempts=claim.attempts)
        try:
            data = imaging.read_file(claim.source, self.config.limits.max_bytes)
            picture = imaging.decode(data, self.config.limits.max_pixels)
        except ImageError as exc:
            self._reject(inbox, claim, exc.reason, exc.message)
            return True
        decoded = Decoded(inbox, claim, picture, hashlib.sha256(data).hexdigest())
        while True:
            if self.stopping.is_set():
                self._release(inbox, claim)
                return True
            try:
                self.decoded_queue.put(decoded, timeout=0.2)
                return True
            except queue.Full:
                continue

    # ----- engine ----------------------------------------------------------------------

    def _engine_step(self) -> bool:
        batching = self.config.batching
        batch, stopped = collect(
            self.decoded_queue, batching.max_batch_size, batching.max_wait_ms / 1000, 0.2
        )
        if self.stopping.is_set():
            # Only the batch already in the model is finished; the rest goes back.
            for decoded in batch:
                self._release(decoded.inbox, decoded.claim)
            stopped = self._release_waiting() or stopped
            return not stopped
        for inferred in self._infer(batch):
            self.publish_queue.put(inferred)
        return not stopped

    def _infer(self, batch: list[Decoded]) -> list[Inferred]:
        """The batch through the model; if it fails, each item alone, so one bad file never
        fails its batch-mates."""
        try:
            alphas = self.engine.predict([d.picture.rgb for d in batch])
            results = [Inferred(d, a, len(batch)) for d, a in zip(batch, alphas, strict=True)]
        except Exception:
            if len(batch) == 1:
                raise
            log.warning("batch of %d failed; retrying its files one by one", len(batch))
            results = []
            for decoded in batch:
                try:
                    results.append(
                        Inferred(decoded, self.engine.predict([decoded.picture.rgb])[0], 1)
                    )
                except Exception as exc:
                    self._reject(
                        decoded.inbox, decoded.claim, Reason.INFERENCE, f"inference failed: {exc}"
                    )
        now, device = time.time(), str(self.engine.device)
        for result in results:
            job = result.decoded.claim.job_id
            self.journal.update(job, inferred_at=now, batch_size=result.batch_size, device=device)
        return results

    def _release_waiting(self) -> bool:
        """Stopping: decoded files that no batch took yet go back to their inbox. True if the
        stop sentinel was among them."""
        while True:
            try:
                item = self.decoded_queue.get_nowait()
            except queue.Empty:
                return False
            if isinstance(item, Stop):
                return True
            self._release(item.inbox, item.claim)

    # ----- publish ---------------------------------------------------------------------

    def _publish_step(self) -> bool:
        item = self.publish_queue.get()
        if isinstance(item, Stop):
            return False
        decoded = item.decoded
        inbox, claim = decoded.inbox, decoded.claim
        config = inbox.config
        folder = PurePosixPath(claim.relative).parent
        stem, suffix = os.path.splitext(claim.name)
        try:
            files = [
                (config.outbox / folder / output.filename(stem, suffix),
                 recipes.render(output, decoded.picture, item.alpha))
                for output in config.outputs
            ]  # fmt: skip
        except (ValueError, ImageError) as exc:
            self._reject(inbox, claim, Reason.ENCODE, f"cannot encode outputs: {exc}")
            return True
        try:
            publish.place_outputs(files, claim.folder / "outputs", publish.DEFAULT_FILE_MODE)
            claim = inbox.claims.record_outcome(claim, "success")
            if config.done is not None:
                target = publish.free_name(config.done / claim.relative, claim.job_id[:8])
                publish.move_file(claim.source, target)
            else:
                os.unlink(claim.source)
        except OSError as exc:
            if exc.errno not in OPERATIONAL_ERRNOS:
                raise
            self._pause(inbox, claim, exc)
            return True
        self.journal.update(claim.job_id, sha256=decoded.sha256,
                            outputs=[str(path) for path, _ in files])  # fmt: skip
        self._close_archived(inbox, claim)
        return True

    def _close_archived(self, inbox: Inbox, claim: Claim) -> None:
        """The original has left the work folder: record how the job ended and forget it."""
        latency = time.time() - claim.detected_at
        if claim.outcome == "success":
            self.journal.update(claim.job_id, outcome="success", published_at=time.time())
            log.info(
                "%s/%s: published in %.0f ms", inbox.config.name, claim.relative, latency * 1000
            )
        else:
            self.journal.update(claim.job_id, outcome="failed")
        inbox.claims.finish(claim)
        self._count(-1)

    def _pause(self, inbox: Inbox, claim: Claim, exc: OSError) -> None:
        """The outbox or archive cannot be written: keep the file, stop taking new ones for a
        while, and try again then."""
        log.error("%s/%s: cannot publish (%s); intake paused for %.0f s, the file is kept",
                  inbox.config.name, claim.relative, exc, PAUSE_SECONDS)  # fmt: skip
        self.paused_until = time.monotonic() + PAUSE_SECONDS
        if claim.outcome:
            claim = inbox.claims.record_outcome(claim, "")
        self._release(inbox, claim)

    # ----- endings ---------------------------------------------------------------------

    def _release(self, inbox: Inbox, claim: Claim) -> None:
        if inbox.claims.release(claim):
            self.journal.forget(claim.job_id)
        else:
            log.warning("%s/%s: a new file took its name; kept for the next start",
                        inbox.config.name, claim.relative)  # fmt: skip
        self._count(-1)

    def _reject(self, inbox: Inbox, claim: Claim, reason: Reason, message: str) -> None:
        """Move the file to errors/ with a sidecar saying why."""
        config = inbox.config
        log.warning("%s/%s: %s (%s)", config.name, claim.relative, message, reason.value)
        target = publish.free_name(config.errors / claim.relative, claim.job_id[:8])
        report: dict[str, object] = {
            "file": claim.relative,
            "inbox": config.name,
            "reason": reason.value,
            "message": f"{claim.name} {message}",
            "attempts": claim.attempts,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": self.host,
            "version": __version__,
            "job": claim.job_id,
        }
        publish.write_error_report(target.with_name(target.name + ".error.json"), report)
        claim = inbox.claims.record_outcome(claim, "failed")
        publish.move_file(claim.source, target)
        self.journal.update(
            claim.job_id, reason=reason.value, error=message, attempts=claim.attempts
        )
        self._close_archived(inbox, claim)
