"""The daemon: wires the stages together, runs each in threads, supervises them, handles
signals and drains. The work itself is in :mod:`hotfolder.stages`.

    intake (watch + claim) ─▶ claims ─▶ decode pool ─▶ decoded ─▶ infer (batches)
        ─▶ inferred ─▶ publish pool ─▶ outbox/ + done/ | errors/

Each stage is one loop around a ``step`` that never blocks for long; a stage thread that dies
stops the process with a non-zero exit code, and a stage that stops stepping makes the health
check fail and the systemd watchdog pings stop, so systemd restarts it rather than leaving a
zombie that accepts files. Signal handlers only set flags.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from hotfolder import __version__, handoff, names, publish
from hotfolder.collect import STOP
from hotfolder.config import Config, InboxConfig
from hotfolder.inboxes import Inbox, InboxSet
from hotfolder.jobs import Reason
from hotfolder.journal import Journal
from hotfolder.metrics import Metrics, MetricsServer
from hotfolder.outcomes import Outcomes
from hotfolder.pipeline import Pipeline
from hotfolder.progress import Progress
from hotfolder.runtime import Engine
from hotfolder.stages.decode import Decode
from hotfolder.stages.infer import Infer
from hotfolder.stages.intake import Intake
from hotfolder.stages.publish import Publish
from hotfolder.status import StatusPage, inbox_states
from hotfolder.systemd import Notifier
from hotfolder.thumbnails import Thumbnails, thumbnail_folder

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED = 0, 1
SUPERVISE_TICK = 0.2


class Service:
    def __init__(
        self,
        cfg: Config,
        engine: Engine,
        once: bool = False,
        metrics: Metrics | None = None,
        notifier: Notifier | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.once = once
        self.metrics = metrics or Metrics()
        self.notifier = notifier or Notifier()
        self.workers = cfg.daemon.workers or os.cpu_count() or 2
        self.inboxes = InboxSet(self._make_inbox)
        self.pipeline = Pipeline(cfg, engine, self.metrics, Journal(cfg.journal), self.inboxes,
                                 once)  # fmt: skip
        if progress is not None:
            self.pipeline.progress = progress
        self.outcomes = Outcomes(self.pipeline)
        self.intake = Intake(self.pipeline, self.outcomes)
        self.decode = Decode(self.pipeline, self.outcomes)
        self.infer = Infer(self.pipeline, self.outcomes)
        # Pictures for the status page, which is served with the metrics.
        self.thumbnails: Thumbnails | None = None
        if cfg.metrics.listen and cfg.metrics.thumbnails_mb:
            self.thumbnails = Thumbnails(thumbnail_folder(cfg), cfg.metrics.thumbnails_mb * 2**20)
        self.publish = Publish(self.pipeline, self.outcomes, self.thumbnails)
        self.fatal: BaseException | None = None
        self.threads: list[threading.Thread] = []
        self.last_step: dict[str, float] = {}
        self.server: MetricsServer | None = None
        self.handoff: handoff.Server | None = None

    @property
    def config(self) -> Config:
        return self.pipeline.config

    @property
    def engine(self) -> Engine:
        return self.pipeline.engine

    def _make_inbox(self, inbox_config: InboxConfig) -> Inbox:
        self.metrics.add_inbox(inbox_config.name)
        self.pipeline.roots_of(inbox_config)  # their filesystems now, before anything goes wrong
        return Inbox(
            inbox_config,
            self.config.daemon.scan_interval_ms / 1000,
            observe=not self.once,
            on_detected=self._detected,
            on_restart=lambda name: self.metrics.observer_restarts.labels(name).inc(),
        )

    def _detected(self, inbox: str, by_scan: bool) -> None:
        self.metrics.detected.labels(inbox).inc()
        self.pipeline.progress.grow()
        if by_scan:
            self.metrics.found_by_scan.labels(inbox).inc()

    # ----- lifecycle -------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until a signal (or, with --once, until the inboxes are empty), drain."""
        self._install_signal_handlers()
        self._bind_metrics_server()  # a taken port stops us before the inboxes are touched
        self._describe_model()
        self.inboxes.start(self.config.inboxes)
        if self.server is not None:
            self.server.start()
        self.intake.probe_folders()
        self.intake.recover()
        try:
            self._run_suspects()
        except Exception as exc:  # the model is broken (it fails on a blank image too)
            log.exception("stopping: the model failed while retrying a file alone")
            self.fatal = exc
        if self.fatal is None:
            self._serve_local_socket()
            self._start_threads()
            self.notifier.notify("READY=1")
            log.info("hotfolder %s serving %d inbox(es)", __version__, len(self.inboxes.active))
            self._supervise()
        self.notifier.notify("STOPPING=1")
        self.metrics.ready.set(0)
        drained = self._drain()
        if self.handoff is not None:
            self.handoff.close()
        self.pipeline.journal.close()
        if self.server is not None:
            self.server.stop()
        if self.fatal is not None:
            log.critical("stopped because a stage failed: %r", self.fatal)
            return EXIT_FAILED
        if self.once and self.pipeline.blocked:
            return EXIT_FAILED
        if self.once and self.pipeline.failed_files:
            log.warning("%d file(s) failed, see the errors folders", self.pipeline.failed_files)
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

    def _serve_local_socket(self) -> None:
        """The warm model for ``hotfolder matte`` on this host (a daemon started with --once
        ends too soon to be worth it)."""
        if self.once:
            return
        cfg = self.config
        inboxes = cfg.inboxes
        self.handoff = handoff.Server(
            handoff.socket_path(cfg.journal.parent),
            self.engine,
            {"model": handoff.model_identity(cfg.model), "precision": self.engine.precision},
            # A reload replaces the config: new connections get its limits.
            lambda: handoff.Limits(
                self.config.limits.max_pixels, self.config.batching.max_batch_size
            ),
            inboxes[0].permissions if inboxes else publish.DEFAULT_PERMISSIONS,
        )
        if not self.handoff.start():
            self.handoff = None

    def _bind_metrics_server(self) -> None:
        """Raises ConfigError when the metrics address cannot be bound."""
        listen = self.config.metrics.listen
        if listen and not self.once:
            self.server = MetricsServer(listen, self.metrics, self.health, self.readiness,
                                        self._status_page().handle)  # fmt: skip

    def _status_page(self) -> StatusPage:
        # Without thumbnails (thumbnails_mb: 0) the page lists jobs without pictures.
        thumbnails = self.thumbnails or Thumbnails(thumbnail_folder(self.config), 0)
        states = inbox_states(lambda: [i.config.name for i in self.inboxes.active],
                              self.metrics.registry, self.pipeline.pause.reasons)  # fmt: skip
        return StatusPage(self.config.journal, thumbnails, states)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def request_stop(signum: int, frame: FrameType | None) -> None:
            self.pipeline.stop_requested.set()

        def request_reload(signum: int, frame: FrameType | None) -> None:
            self.pipeline.reload_requested.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGHUP, request_reload)

    def _run_suspects(self) -> None:
        """Jobs that were being decoded, in the model or encoded when a daemon died, one at a
        time with nothing else running, before the stages start: a file that kills the
        process now is the one to blame (its crash is charged when the next daemon adopts
        it), and its former batch-mates are published."""
        limit = self.config.daemon.max_attempts
        suspects = self.pipeline.suspects
        while suspects:
            inbox, claim = suspects.popleft()
            if claim.crashes >= limit:
                message = f"stopped the daemon {claim.crashes} times while alone in it"
                self.outcomes.reject(inbox, claim, Reason.REPEATED_FAILURE, message)
                continue
            log.info("%s/%s: retrying alone: it was being processed when a daemon stopped",
                     inbox.config.name, names.escape(claim.relative))  # fmt: skip
            decoded = self.decode.decode(inbox, claim)
            for inferred in self.infer.infer([decoded] if decoded else []):
                self.publish.publish(inferred)

    # ----- threads -----------------------------------------------------------------------

    def _start_threads(self) -> None:
        stages: list[tuple[str, Callable[[], bool]]] = [("intake", self.intake.step)]
        stages += [(f"decode-{i}", self.decode.step) for i in range(self.workers)]
        stages += [("engine", self.infer.step)]
        stages += [(f"publish-{i}", self.publish.step) for i in range(self.workers)]
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
            self.pipeline.stopping.set()
            self.pipeline.stop_requested.set()
        finally:
            self.last_step.pop(name, None)

    def _supervise(self) -> None:
        """The main thread: readiness, and systemd watchdog pings only while healthy."""
        last_ping = 0.0
        while not self.pipeline.stop_requested.wait(SUPERVISE_TICK):
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
        paused, stopping = self.pipeline.paused(), self.pipeline.stopping.is_set()
        ok = self.engine.warmup_seconds > 0 and not paused and not stopping
        return ok, {"paused": paused, "stopping": stopping}

    def _drain(self) -> bool:
        """Stop intake, finish the in-flight batch, give unstarted claims back; within the
        configured timeout. False if something was still running at the deadline."""
        pipeline = self.pipeline
        pipeline.stopping.set()
        deadline = time.monotonic() + self.config.daemon.drain_timeout_ms / 1000
        # Upstream first: each stage's sentinels queue behind the work already handed to it.
        stages: list[tuple[str, queue.Queue[Any] | None]] = [
            ("intake", None),
            ("decode", pipeline.claims),
            ("engine", pipeline.decoded),
            ("publish", pipeline.inferred),
        ]
        for stage, inbound in stages:
            threads = [t for t in self.threads if t.name.split("-")[0] == stage]
            alive = [t for t in threads if t.is_alive()]
            if stage == "engine" and not alive:
                self.infer.release_waiting()  # the engine died: nobody will take these files
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
            import torch  # only a GPU's engine has loaded it; ONNX Runtime's CPU engine never does

            peak = torch.cuda.max_memory_allocated(str(self.engine.device))
            log.info("peak GPU memory %d MiB", peak // 2**20)
        log.info("time by stage: %s", stage_summary(self.metrics.stage_totals()))
        log.info("stopped cleanly")
        return True


def stage_summary(totals: dict[str, tuple[float, int]]) -> str:
    """``decode 12.3 s / 100 (123 ms each), ...``: where a run's time went, stage by stage (busy
    seconds summed over the threads of a stage; ``inference`` counts batches, the rest files)."""
    return ", ".join(
        f"{stage} {seconds:.1f} s / {count} ({1000 * seconds / max(count, 1):.1f} ms each)"
        for stage, (seconds, count) in totals.items()
    )
