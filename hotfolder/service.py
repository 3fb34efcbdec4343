"""The daemon: stage threads joined by bounded queues, signals, health, graceful drain.

    intake (watch + claim) ─▶ claim queue ─▶ decode pool ─▶ decoded queue ─▶ engine (batches)
        ─▶ publish queue ─▶ publish pool ─▶ outbox/ + done/ | errors/

Every queue is bounded, so a backlog of 100 000 files stays in the inbox, not in memory: the
intake claims a file only when the claim queue has room. Each stage is one loop around a
``step`` that never blocks for long; a stage thread that dies stops the process with a non-zero
exit code, and a stage that stops stepping makes the health check fail and the systemd watchdog
pings stop, so systemd restarts it rather than leaving a zombie that accepts files. Signal
handlers only set flags; SIGHUP re-reads the config in the intake thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import queue
import shutil
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from types import FrameType
from typing import Any

import numpy as np
import torch

from hotfolder import __version__, config, imaging, names, naming, publish, recipes, roots
from hotfolder.claims import Claim
from hotfolder.collect import STOP, Stop, collect
from hotfolder.engine import MattingEngine
from hotfolder.inboxes import Inbox, InboxSet
from hotfolder.jobs import ImageError, Reason
from hotfolder.journal import Journal
from hotfolder.metrics import Metrics, MetricsServer
from hotfolder.roots import Pause, Roots
from hotfolder.systemd import Notifier
from hotfolder.watch import Ready

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED = 0, 1
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
# Config sections a SIGHUP cannot change in a running process (inboxes, outputs, batching and
# limits apply at once).
RESTART_ONLY = ("model", "daemon", "metrics", "journal")
PROBE_SECONDS = 1.0  # while paused, each folder that failed is probed this often
# Free space a folder that ran out must offer again, as a multiple of what the failed job needed:
# resuming with room for exactly one job would fail the next one and pause again.
SPACE_MARGIN = 2
INTAKE_TICK = 0.05
QUEUE_POLL = 1.0  # a stage waiting for work still steps this often (it proves it is alive)
HOUSEKEEPING_SECONDS = 5.0  # heartbeats, backlog gauges, disk space, GPU memory


@dataclass(frozen=True)
class Decoded:
    inbox: Inbox
    claim: Claim
    picture: imaging.Picture
    sha256: str
    decode_seconds: float
    decoded_at: float  # monotonic


@dataclass(frozen=True)
class Inferred:
    decoded: Decoded
    alpha: np.ndarray
    batch_size: int
    queue_seconds: float
    inference_seconds: float
    inferred_at: float  # wall clock, for the journal


class Service:
    def __init__(
        self,
        cfg: config.Config,
        engine: MattingEngine,
        once: bool = False,
        metrics: Metrics | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = cfg
        self.engine = engine
        self.once = once
        self.metrics = metrics or Metrics()
        self.notifier = notifier or Notifier()
        batch = cfg.batching.max_batch_size
        self.workers = cfg.daemon.workers or os.cpu_count() or 2
        self.inboxes = InboxSet(self._make_inbox)
        self.journal = Journal(cfg.journal)
        self.claim_queue: queue.Queue[tuple[Inbox, Claim] | Stop] = queue.Queue(batch)
        self.decoded_queue: queue.Queue[Decoded | Stop] = queue.Queue(2 * batch)
        self.publish_queue: queue.Queue[Inferred | Stop] = queue.Queue(2 * batch)
        self.ready: deque[tuple[Inbox, Ready]] = deque()
        self.recovered: deque[tuple[Inbox, Claim]] = deque()
        self.stopping = threading.Event()  # stop taking new work
        self.stop_requested = threading.Event()  # set by signals, or when --once is done
        self.reload_requested = threading.Event()
        self.fatal: BaseException | None = None
        self.in_flight = 0
        self.in_flight_lock = threading.Lock()
        self.pause = Pause(PROBE_SECONDS)
        self.roots: dict[tuple[Path, ...], Roots] = {}
        # Jobs whose inbox went away (share dropped, folder deleted): neither finished nor put
        # back, until the inbox is reachable again.
        self.parked: list[tuple[Inbox, Claim]] = []
        self.parked_lock = threading.Lock()
        self.scanned_once = False
        self.threads: list[threading.Thread] = []
        self.last_step: dict[str, float] = {}
        self.next_housekeeping = 0.0
        self.host = socket.gethostname()
        self.server: MetricsServer | None = None

    def _make_inbox(self, inbox_config: config.InboxConfig) -> Inbox:
        self.metrics.add_inbox(inbox_config.name)
        self._roots_of(inbox_config)  # their filesystems now, before anything goes wrong
        return Inbox(
            inbox_config,
            self.config.daemon.scan_interval_ms / 1000,
            observe=not self.once,
            on_detected=self._detected,
            on_restart=lambda name: self.metrics.observer_restarts.labels(name).inc(),
        )

    def _detected(self, inbox: str, by_scan: bool) -> None:
        self.metrics.detected.labels(inbox).inc()
        if by_scan:
            self.metrics.found_by_scan.labels(inbox).inc()

    # ----- lifecycle -------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until a signal (or, with --once, until the inboxes are empty), drain."""
        self._install_signal_handlers()
        self._describe_model()
        self.inboxes.start(self.config.inboxes)
        self._start_metrics_server()
        self._recover()
        self._start_threads()
        self.notifier.notify("READY=1")
        log.info("hotfolder %s serving %d inbox(es)", __version__, len(self.inboxes.active))
        self._supervise()
        self.notifier.notify("STOPPING=1")
        self.metrics.ready.set(0)
        drained = self._drain()
        self.journal.close()
        if self.server is not None:
            self.server.stop()
        if self.fatal is not None:
            log.critical("stopped because a stage failed: %r", self.fatal)
            return EXIT_FAILED
        return EXIT_OK if drained else EXIT_FAILED

    def _describe_model(self) -> None:
        self.metrics.build.info({"version": __version__, "model": self.config.model.name})
        self.metrics.device.info(
            {"device": str(self.engine.device), "precision": self.engine.precision}
        )
        self.metrics.model_load.set(self.engine.load_seconds)
        self.metrics.model_warmup.set(self.engine.warmup_seconds)
        self.engine.on_split = lambda size: self.metrics.oom_splits.inc()

    def _start_metrics_server(self) -> None:
        listen = self.config.metrics.listen
        if listen and not self.once:
            self.server = MetricsServer(listen, self.metrics, self.health, self.readiness)
            self.server.start()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def request_stop(signum: int, frame: FrameType | None) -> None:
            self.stop_requested.set()

        def request_reload(signum: int, frame: FrameType | None) -> None:
            self.reload_requested.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGHUP, request_reload)

    def _supervise(self) -> None:
        """The main thread: readiness, and systemd watchdog pings only while healthy."""
        last_ping = 0.0
        while not self.stop_requested.wait(0.2):
            if self.fatal is not None:
                return
            healthy, _ = self.health()
            ready, _ = self.readiness()
            self.metrics.ready.set(int(healthy and ready))
            interval = self.notifier.watchdog_interval
            now = time.monotonic()
            if interval and healthy and now - last_ping >= interval:
                self.notifier.notify("WATCHDOG=1")
                last_ping = now

    def health(self) -> tuple[bool, dict[str, object]]:
        """Every stage thread alive and stepping, every watcher alive."""
        now = time.monotonic()
        limit = self.config.daemon.stall_timeout_ms / 1000
        dead = [t.name for t in self.threads if not t.is_alive()]
        stalled = [name for name, at in self.last_step.items() if now - at > limit]
        watchers = [i.config.name for i in self.inboxes.active if not i.watcher.healthy()]
        ok = bool(self.threads) and not dead and not stalled and not watchers
        return ok, {"dead": dead, "stalled": stalled, "watchers_down": watchers}

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Model loaded and warm, intake open."""
        paused = self.pause.active
        ok = self.engine.warmup_seconds > 0 and not paused and not self.stopping.is_set()
        return ok, {"paused": paused, "stopping": self.stopping.is_set()}

    def _start_threads(self) -> None:
        stages: list[tuple[str, Callable[[], bool]]] = [("intake", self._intake_step)]
        stages += [(f"decode-{i}", self._decode_step) for i in range(self.workers)]
        stages += [("engine", self._engine_step)]
        stages += [(f"publish-{i}", self._publish_step) for i in range(self.workers)]
        for name, step in stages:
            thread = threading.Thread(target=self._loop, args=(name, step), name=name, daemon=True)
            self.last_step[name] = time.monotonic()
            thread.start()
            self.threads.append(thread)

    def _loop(self, name: str, step: Callable[[], bool]) -> None:
        """One loop, many steps: run ``step`` until it says the stage is finished."""
        try:
            while step():
                self.last_step[name] = time.monotonic()
        except BaseException as exc:
            log.exception("stage %s failed", name)
            self.fatal = exc
            self.stopping.set()
            self.stop_requested.set()
        finally:
            self.last_step.pop(name, None)

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
            alive = [t for t in threads if t.is_alive()]
            if stage == "engine" and not alive:
                self._release_waiting()  # the engine died: nobody will take these files
            for _ in alive:
                if inbound is not None:
                    with contextlib.suppress(queue.Full):
                        inbound.put(STOP, timeout=max(deadline - time.monotonic(), 0.01))
            for thread in alive:
                thread.join(max(deadline - time.monotonic(), 0))
        running = [t.name for t in self.threads if t.is_alive()]
        if running:
            log.error("drain timeout: still running: %s", ", ".join(running))
            return False
        self.inboxes.stop()
        if self.engine.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.engine.device)
            log.info("peak GPU memory %d MiB", peak // 2**20)
        log.info("stopped cleanly")
        return True

    def _recover(self) -> None:
        for inbox in self.inboxes.active:
            for claim in inbox.claims.recover():
                try:
                    self._resume(inbox, claim)
                except Exception as exc:  # one bad job never keeps the daemon from serving
                    self._abandon(inbox, claim, exc)

    def _resume(self, inbox: Inbox, claim: Claim) -> None:
        log.info("%s/%s: resuming a job left by a stopped daemon", inbox.config.name,
                 names.escape(claim.relative))  # fmt: skip
        self._count(+1)
        self._begin(claim)
        if claim.outcome:
            # Stopped after deciding the outcome: finish filing the original if the daemon
            # died before it left the work folder.
            if os.path.lexists(claim.source):
                self._file_original(inbox.config, claim)
            self._close_archived(inbox, claim)
        else:
            self.recovered.append((inbox, claim))

    def _abandon(self, inbox: Inbox, claim: Claim, error: Exception) -> None:
        """A left-over job that cannot be resumed: its file goes to errors/ with the reason.
        If even that fails (errors/ unwritable), the job stays where it is for the next start,
        and the daemon serves on."""
        log.exception("%s/%s: cannot resume this job", inbox.config.name,
                      names.escape(claim.relative))  # fmt: skip
        try:
            if claim.outcome and not os.path.lexists(claim.source):
                self._close_archived(inbox, claim)  # only the record was left
            else:
                self._reject(inbox, claim, Reason.RECOVERY, f"could not be resumed: {error}")
        except Exception:
            log.exception("%s/%s: left in %s for the next start", inbox.config.name,
                          names.escape(claim.relative), claim.folder)  # fmt: skip

    def _begin(self, claim: Claim) -> None:
        self.journal.begin(
            claim.job_id, inbox=claim.inbox, path=names.escape(claim.relative), size=claim.size,
            detected_at=claim.detected_at, claimed_at=claim.claimed_at,
            attempts=claim.attempts, outcome="claimed", host=self.host,
        )  # fmt: skip

    def _count(self, delta: int) -> None:
        with self.in_flight_lock:
            self.in_flight += delta
            self.metrics.in_flight.set(self.in_flight)

    # ----- intake ----------------------------------------------------------------------

    def _intake_step(self) -> bool:
        if self.stopping.is_set():
            return False
        if self.reload_requested.is_set():
            self.reload_requested.clear()
            self._reload()
        now = time.monotonic()
        for inbox in self.inboxes.active:
            for ready in inbox.watcher.step(now):
                self.ready.append((inbox, ready))
        self.scanned_once = True
        self._check_roots(now)
        if self.pause.active:
            self._probe(now)
        self._show_pause()
        if not self.pause.active:
            self._feed_claims()
        if now >= self.next_housekeeping:
            self.next_housekeeping = now + HOUSEKEEPING_SECONDS
            self._housekeeping()
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
            if self._roots_of(inbox.config).away():
                self.ready.appendleft((inbox, ready))
                return  # the next tick pauses intake for it
            try:
                claim = inbox.claims.claim(ready.relative, ready.detected_at)
            except OSError as exc:
                reason = PAUSE_REASONS.get(exc.errno or 0, roots.AWAY)
                self._hold_failing(inbox.config, reason, 0, exc)
                self.ready.appendleft((inbox, ready))
                return
            inbox.watcher.done(ready.relative)
            if claim is None:
                continue  # gone, or another daemon took it
            self._count(+1)
            self._begin(claim)
            self.claim_queue.put((inbox, claim))

    def _observe_backlog(self) -> None:
        """Files seen but not claimed yet: settling in the watcher, or ready and waiting for
        room in the pipeline."""
        now = time.time()
        waiting = {id(inbox): 0 for inbox in self.inboxes.active}
        oldest = {
            id(inbox): inbox.watcher.oldest_detected() or now for inbox in self.inboxes.active
        }
        for inbox, ready in self.ready:  # one pass: a backlog can be long
            if id(inbox) in waiting:
                waiting[id(inbox)] += 1
                oldest[id(inbox)] = min(oldest[id(inbox)], ready.detected_at)
        for inbox in self.inboxes.active:
            name, key = inbox.config.name, id(inbox)
            self.metrics.pending.labels(name).set(len(inbox.watcher.pending) + waiting[key])
            self.metrics.oldest_pending.labels(name).set(now - oldest[key])

    def _housekeeping(self) -> None:
        self._observe_backlog()
        self.inboxes.heartbeat(lambda inbox: not self._inbox_away(inbox))
        self.inboxes.close_retired(lambda inbox: inbox.claims.has_jobs())
        for inbox in self.inboxes.active:
            cfg = inbox.config
            for folder, path in (("inbox", cfg.path), ("outbox", cfg.outbox),
                                 ("done", cfg.done), ("errors", cfg.errors)):  # fmt: skip
                if path is not None:
                    with contextlib.suppress(OSError):
                        free = shutil.disk_usage(path).free
                        self.metrics.disk_free.labels(cfg.name, folder).set(free)
        if self.engine.device.type == "cuda":
            gpu = self.engine.device
            self.metrics.gpu_memory.labels("allocated").set(torch.cuda.memory_allocated(gpu))
            self.metrics.gpu_memory.labels("reserved").set(torch.cuda.memory_reserved(gpu))

    def _idle(self) -> bool:
        with self.in_flight_lock:
            busy = self.in_flight
        pending = any(inbox.watcher.pending for inbox in self.inboxes.active)
        waiting = self.ready or self.recovered
        return self.scanned_once and not busy and not pending and not waiting

    def _reload(self) -> None:
        """SIGHUP: apply a new config, or refuse it and keep the running one."""
        source = self.config.source
        try:
            if source is None:
                raise config.ConfigError("the daemon was started without a config file")
            new = config.load(source)
            config.ensure_folders(new)
        except config.ConfigError as exc:
            log.error("config reload refused, the running config stays: %s", exc)
            self.metrics.reloads.labels("failure").inc()
            self.metrics.reload_ok.set(0)
            return
        changed = [s for s in RESTART_ONLY if getattr(new, s) != getattr(self.config, s)]
        if changed:
            log.warning(
                "config reload: changes to %s apply at the next restart", ", ".join(changed)
            )
        self.config = replace(new, **{s: getattr(self.config, s) for s in RESTART_ONLY})
        self.inboxes.apply(new.inboxes)
        self.ready = deque((i, r) for i, r in self.ready if i in self.inboxes.active)
        self.metrics.reloads.labels("success").inc()
        self.metrics.reload_ok.set(1)
        log.info("config reloaded from %s: %d inbox(es)", source, len(self.inboxes.active))

    # ----- pausing ---------------------------------------------------------------------

    def _roots_of(self, cfg: config.InboxConfig) -> Roots:
        """The folders of an inbox, as they were when first seen with these paths."""
        folders = tuple(f for f in (cfg.path, cfg.outbox, cfg.done, cfg.errors) if f is not None)
        if folders not in self.roots:
            self.roots[folders] = Roots(folders)
        return self.roots[folders]

    def _check_roots(self, now: float) -> None:
        """A root that went away (share dropped, folder deleted) pauses intake until it is back:
        nothing is claimed from, or created in, a bare mountpoint."""
        for inbox in self.inboxes.active:
            for root in self._roots_of(inbox.config).away():
                self._hold(root, roots.AWAY, now, 0, "missing, or not the filesystem it was on")

    def _hold(self, root: roots.Root, reason: str, now: float, need: int, why: object) -> None:
        if self.pause.hold(root, reason, now, need):
            log.error("intake paused (%s): %s: %s; probing it every %.0f s until it can be "
                      "written", reason, root.path, why, PROBE_SECONDS)  # fmt: skip

    def _hold_failing(self, cfg: config.InboxConfig, reason: str, need: int, why: object) -> None:
        """Pause until every root of the inbox that fails a probe now passes one (all of
        them, if none fails now: the trouble was fleeting, one probe round confirms it)."""
        now = time.monotonic()
        every = self._roots_of(cfg).roots
        for root in [r for r in every if not roots.usable(r, need)] or every:
            self._hold(root, reason, now, need, why)

    def _probe(self, now: float) -> None:
        for root in self.pause.probe_due(now):
            log.info("%s can be written again", root.path)
        if not self.pause.active:
            log.info("intake resumed")
            self._unpark()

    def _show_pause(self) -> None:
        held = self.pause.reasons()
        for reason in set(PAUSE_REASONS.values()):
            self.metrics.paused.labels(reason).set(int(reason in held))

    def _cannot_continue(self, inbox: Inbox, claim: Claim, exc: OSError, need: int = 0) -> bool:
        """A job failed on disk: set it aside and pause intake if the machine, not the file, is
        at fault. ``need``: bytes the job needed. False if ``exc`` is none of those troubles
        (the caller re-raises it)."""
        away = self._roots_of(inbox.config).away()
        shown = f"{inbox.config.name}/{names.escape(claim.relative)}"
        if away:
            now = time.monotonic()
            for root in away:
                self._hold(root, roots.AWAY, now, 0, exc)
            self._release(inbox, claim)  # parked instead while the inbox itself is away
            return True
        if not claim.folder.is_dir():
            self._drop(inbox, claim, exc)
            return True
        reason = PAUSE_REASONS.get(exc.errno or 0)
        if reason is None:
            return False
        log.error("%s: cannot be finished (%s); the file goes back to the inbox", shown, exc)
        self._hold_failing(inbox.config, reason, need, exc)
        self._release(inbox, claim)
        return True

    def _inbox_away(self, inbox: Inbox) -> bool:
        return any(r.path == inbox.config.path for r in self._roots_of(inbox.config).away())

    def _drop(self, inbox: Inbox, claim: Claim, exc: OSError) -> None:
        """The job's folder vanished with its file (the inbox was deleted or replaced): there
        is nothing left to finish or put back."""
        log.warning("%s/%s: its work folder vanished with the file (inbox deleted?); the job "
                    "is dropped: %s", inbox.config.name, names.escape(claim.relative),
                    exc)  # fmt: skip
        self.journal.forget(claim.job_id)
        self._count(-1)

    def _park(self, inbox: Inbox, claim: Claim) -> None:
        """The job's inbox is unreachable: neither finish it nor put it back; wait for it."""
        log.warning("%s/%s: its inbox is unreachable; the job waits for it", inbox.config.name,
                    names.escape(claim.relative))  # fmt: skip
        self.journal.forget(claim.job_id)  # not begun, as far as anyone can tell
        with self.parked_lock:
            self.parked.append((inbox, claim))
        self._count(-1)

    def _unpark(self) -> None:
        """Every root is back: each parked job is finished if its outcome was recorded, else
        its file goes back to the inbox, as its job folder now says. A job whose folder did not
        come back (a fresh share) is forgotten."""
        with self.parked_lock:
            parked, self.parked = self.parked, []
        for inbox in self.inboxes.active:
            if not self._inbox_away(inbox):
                with contextlib.suppress(OSError):
                    inbox.claims.open()  # a share back without our work folder needs it again
        for inbox, claim in parked:
            current = inbox.claims.reread(claim)
            if current is None:
                log.warning("%s/%s: its job did not come back with the inbox", inbox.config.name,
                            names.escape(claim.relative))  # fmt: skip
                continue
            if not current.outcome:
                self._count(+1)
                self._release(inbox, current)
                continue
            try:
                self._resume(inbox, current)  # file the original where its outcome sends it
            except OSError as exc:
                if not self._cannot_continue(inbox, current, exc):
                    raise

    # ----- decode ----------------------------------------------------------------------

    def _decode_step(self) -> bool:
        try:
            item = self.claim_queue.get(timeout=QUEUE_POLL)
        except queue.Empty:
            return True
        if isinstance(item, Stop):
            return False
        inbox, claim = item
        if self.stopping.is_set() or self.pause.active:  # paused: decode nothing unpublishable
            self._release(inbox, claim)
            return True
        if claim.attempts >= self.config.daemon.max_attempts:
            self._reject(inbox, claim, Reason.REPEATED_FAILURE,
                         f"failed or stopped the daemon {claim.attempts} times")  # fmt: skip
            return True
        try:
            claim = inbox.claims.record_attempt(claim)
            started = time.monotonic()
            data = imaging.read_file(claim.source, self.config.limits.max_bytes)
            picture = imaging.decode(data, self.config.limits.max_pixels)
        except ImageError as exc:
            self._reject(inbox, claim, exc.reason, exc.message)
            return True
        except OSError as exc:
            if not self._cannot_continue(inbox, claim, exc):
                raise
            return True
        decoded_at = time.monotonic()
        digest = hashlib.sha256(data).hexdigest()
        decoded = Decoded(inbox, claim, picture, digest, decoded_at - started, decoded_at)
        self.metrics.stage.labels("decode").observe(decoded.decode_seconds)
        while not self.stopping.is_set() and not self.pause.active:
            try:
                self.decoded_queue.put(decoded, timeout=0.2)
                return True
            except queue.Full:
                continue
        self._release(inbox, claim)
        return True

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
        if self.pause.active:  # nothing goes through the model that could not be published
            for decoded in batch:
                self._release(decoded.inbox, decoded.claim)
            return not stopped
        for inferred in self._infer(batch):
            self.publish_queue.put(inferred)
        return not stopped

    def _infer(self, batch: list[Decoded]) -> list[Inferred]:
        """The batch through the model, with its metrics. The journal is written when each job
        ends, off this thread."""
        if not batch:
            return []
        started = time.monotonic()
        pairs, sizes = self._predict(batch)
        took = time.monotonic() - started
        self.metrics.stage.labels("inference").observe(took)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.executions.inc()
        self.metrics.inferences.inc(len(batch))
        now = time.time()
        results = []
        for (decoded, alpha), size in zip(pairs, sizes, strict=True):
            waited = started - decoded.decoded_at
            self.metrics.stage.labels("queue").observe(waited)
            results.append(Inferred(decoded, alpha, size, waited, took, now))
        return results

    def _predict(self, batch: list[Decoded]) -> tuple[list[tuple[Decoded, np.ndarray]], list[int]]:
        """(file, alpha) pairs and the batch size each ran in. If the batch fails, each file
        runs alone, so one bad file never fails its batch-mates. Files that fail alone go to
        errors/, unless the model fails its self-check too: then the device is at fault, the
        files go back to the inbox untouched and the stage stops (the process exits 1)."""
        try:
            alphas = self.engine.predict([d.picture.rgb for d in batch])
            return list(zip(batch, alphas, strict=True)), [len(batch)] * len(batch)
        except Exception as exc:
            log.warning("batch of %d failed (%s); retrying its files one by one", len(batch), exc)
        pairs, failed = [], []
        for decoded in batch:
            try:
                pairs.append((decoded, self.engine.predict([decoded.picture.rgb])[0]))
            except Exception as exc:
                failed.append((decoded, exc))
        if failed and not self._engine_works():
            for decoded, _ in failed:
                self._release(decoded.inbox, decoded.claim)
            raise RuntimeError("the model fails on a blank image too") from failed[0][1]
        for decoded, error in failed:
            message = f"inference failed: {error}"
            self._reject(decoded.inbox, decoded.claim, Reason.INFERENCE, message)
        return pairs, [1] * len(pairs)

    def _engine_works(self) -> bool:
        try:
            self.engine.predict([np.zeros((32, 32, 3), np.uint8)])
        except Exception:
            log.exception("model self-check failed")
            return False
        return True

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
        try:
            item = self.publish_queue.get(timeout=QUEUE_POLL)
        except queue.Empty:
            return True
        if isinstance(item, Stop):
            return False
        decoded = item.decoded
        inbox, claim = decoded.inbox, decoded.claim
        if self.pause.active:  # not even encoded: it goes back, and is processed after the pause
            self._release(inbox, claim)
            return True
        inference = {"inferred_at": item.inferred_at, "batch_size": item.batch_size,
                     "device": str(self.engine.device)}  # fmt: skip
        started = time.monotonic()
        try:
            picture, alpha = decoded.picture, item.alpha
            rendered = [recipes.render(o, picture, alpha) for o in inbox.config.outputs]
        except (ValueError, ImageError) as exc:
            message = f"cannot encode outputs: {exc}"
            self._reject(inbox, claim, Reason.ENCODE, message, inference)
            return True
        encoded = time.monotonic()
        self.metrics.stage.labels("encode").observe(encoded - started)
        try:
            files = list(zip(self._output_names(inbox, claim), rendered, strict=True))
            claim = self._archive(inbox, claim, files)
        except naming.NameCollisionError as exc:
            self._reject(inbox, claim, Reason.NAME_COLLISION, str(exc), inference)
            return True
        except publish.UnsafePathError as exc:
            self._reject(inbox, claim, Reason.UNSAFE_PATH, f"not published: {exc}", inference)
            return True
        except OSError as exc:
            need = SPACE_MARGIN * (sum(len(data) for data in rendered) + claim.size)
            if not self._cannot_continue(inbox, claim, exc, need):
                raise
            return True
        self.metrics.stage.labels("publish").observe(time.monotonic() - encoded)
        timings = {
            "decode": decoded.decode_seconds, "queue": item.queue_seconds,
            "inference": item.inference_seconds, "encode": encoded - started,
            "publish": time.monotonic() - encoded,
        }  # fmt: skip
        outputs = [names.escape(str(inbox.config.outbox / path)) for path, _ in files]
        record = {**inference, "attempts": claim.attempts, "sha256": decoded.sha256,
                  "outputs": outputs}  # fmt: skip
        self._close_archived(inbox, claim, record, timings, item.batch_size)
        return True

    def _output_names(self, inbox: Inbox, claim: Claim) -> list[PurePosixPath]:
        """Output paths (relative to the outbox) no other input owns, by the inbox's policy."""
        cfg = inbox.config
        owner = f"{cfg.name}:{names.escape(claim.relative)}"

        def key(path: PurePosixPath) -> str:
            return names.escape(str(cfg.outbox / path))

        def taken(escaped: str) -> bool:
            return os.path.lexists(names.unescape(escaped))

        return naming.choose(
            cfg.outputs, claim.relative, cfg.collisions, owner, self.journal, key, taken
        )

    def _archive(
        self, inbox: Inbox, claim: Claim, files: list[tuple[PurePosixPath, bytes]]
    ) -> Claim:
        """Outputs into the outbox, then (only then) the original out of the work folder."""
        cfg = inbox.config
        if cfg.done is not None:  # refuse a linked done/ folder before anything is published
            with publish.open_folder(cfg.done, PurePosixPath(claim.relative).parent,
                                     cfg.permissions):  # fmt: skip
                pass
        publish.place_outputs(files, cfg.outbox, claim.folder / "outputs", cfg.permissions)
        claim = inbox.claims.record_outcome(claim, "success")
        try:
            self._file_original(cfg, claim)
        except OSError:
            # The original did not move: its record must not say the job succeeded, or a later
            # start would journal a success whose original never reached done/.
            with contextlib.suppress(OSError):
                inbox.claims.record_outcome(claim, "")
            raise
        return claim

    @staticmethod
    def _file_original(cfg: config.InboxConfig, claim: Claim) -> None:
        """Move the original out of the work folder to where its recorded outcome sends it."""
        destination = original_destination(cfg, claim.outcome)
        if destination is None:
            os.unlink(claim.source)
            return
        tag = claim.job_id[:8]
        try:
            publish.archive(claim.source, destination, claim.relative, tag, cfg.permissions)
        except publish.UnsafePathError as exc:
            # A link where its subfolder should be: the top of the folder, never the link.
            log.error("%s; %s goes to %s instead", exc, names.escape(claim.name), destination)
            publish.archive(claim.source, destination, claim.name, tag, cfg.permissions)

    def _close_archived(
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
        shown = names.escape(claim.relative)
        record = record or {}
        if claim.outcome == "success":
            now = time.time()
            latency = now - claim.detected_at
            self.journal.update(claim.job_id, outcome="success", published_at=now, **record)
            self.metrics.processed.labels(name, "success").inc()
            self.metrics.latency.labels(name).observe(latency)
            self.metrics.last_success.labels(name).set(now)
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
            self.journal.update(claim.job_id, outcome="failed", **record)
            self.metrics.processed.labels(name, "failed").inc()
        inbox.claims.finish(claim)
        self._count(-1)

    # ----- endings ---------------------------------------------------------------------

    def _release(self, inbox: Inbox, claim: Claim) -> None:
        if self._inbox_away(inbox):
            self._park(inbox, claim)  # putting it back would create folders in a bare mountpoint
            return
        try:
            released = inbox.claims.release(claim)
        except OSError as exc:
            if not claim.folder.is_dir():
                self._drop(inbox, claim, exc)
                return
            log.error("%s/%s: cannot be put back (%s)", inbox.config.name,
                      names.escape(claim.relative), exc)  # fmt: skip
            self._park(inbox, claim)
            return
        if released:
            self.journal.forget(claim.job_id)
        else:
            log.warning("%s/%s: a new file took its name; kept for the next start",
                        inbox.config.name, names.escape(claim.relative))  # fmt: skip
        self._count(-1)

    def _reject(
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
            "host": self.host,
            "version": __version__,
            "job": claim.job_id,
        }
        try:
            self._write_error_report(cfg, claim, report)
            claim = inbox.claims.record_outcome(claim, "failed")
            self._file_original(cfg, claim)
        except OSError as exc:
            if not self._cannot_continue(inbox, claim, exc):
                raise
            return
        self.metrics.failures.labels(cfg.name, reason.value).inc()
        record = {**(columns or {}), "reason": reason.value, "error": message,
                  "attempts": claim.attempts}  # fmt: skip
        self._close_archived(inbox, claim, record)

    @staticmethod
    def _write_error_report(
        cfg: config.InboxConfig, claim: Claim, report: dict[str, object]
    ) -> None:
        """The sidecar beside where :meth:`_file_original` will put the rejected file."""
        tag = claim.job_id[:8]
        try:
            publish.write_error_report(cfg.errors, claim.relative, tag, report, cfg.permissions)
        except publish.UnsafePathError:
            publish.write_error_report(cfg.errors, claim.name, tag, report, cfg.permissions)


def original_destination(cfg: config.InboxConfig, outcome: str) -> Path | None:
    """The folder the original of a finished job goes to: errors/ when it failed, done/ when it
    succeeded (None: originals are deleted)."""
    return cfg.done if outcome == "success" else cfg.errors
