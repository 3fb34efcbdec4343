"""Every metric hotfolder exports, in one place, and the HTTP endpoints that serve them.

Names are in base units with the usual suffixes; labels come from fixed sets only (inbox names
from the config, outcomes, reason codes, stage names), never a file or user name. The registry
is injectable so tests read values back, as prometheus_client's own tests do.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from hotfolder.config import ConfigError
from hotfolder.jobs import Reason

log = logging.getLogger(__name__)

STAGES = ("decode", "queue", "inference", "encode", "publish")
PAUSE_REASONS = ("disk_full", "read_only", "io_error")
FOLDERS = ("inbox", "outbox", "done", "errors")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# A check returns (healthy, details for people).
Check = Callable[[], tuple[bool, dict[str, object]]]
# More pages (the status page): a request's target → (status, body, content type), or None.
Pages = Callable[[str], tuple[int, bytes, str] | None]
# Nothing served here runs a script from elsewhere, is framed, or is cached by a proxy.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build = Info("hotfolder_build", "Version and model of this daemon.", registry=r)
        self.device = Info("hotfolder_device", "Where the model runs.", registry=r)
        self.model_load = Gauge(
            "hotfolder_model_load_seconds", "Time to load the model weights.", registry=r
        )
        self.model_warmup = Gauge(
            "hotfolder_model_warmup_seconds", "Time of the warm-up batch.", registry=r
        )
        self.ready = Gauge(
            "hotfolder_ready", "1 when serving: model warm, intake open.", registry=r
        )
        self.detected = Counter(
            "hotfolder_files_detected", "Files noticed in an inbox.", ["inbox"], registry=r
        )
        self.found_by_scan = Counter(
            "hotfolder_files_found_by_scan",
            "Files found by a folder scan before any event reported them (missed events).",
            ["inbox"],
            registry=r,
        )
        self.processed = Counter(
            "hotfolder_files_processed", "Files finished, by outcome.", ["inbox", "outcome"],
            registry=r,
        )  # fmt: skip
        self.failures = Counter(
            "hotfolder_failures", "Files sent to errors/, by reason.", ["inbox", "reason"],
            registry=r,
        )  # fmt: skip
        self.pending = Gauge(
            "hotfolder_pending_files", "Files in an inbox not yet claimed.", ["inbox"], registry=r
        )
        self.oldest_pending = Gauge(
            "hotfolder_oldest_pending_age_seconds",
            "Age of the oldest file waiting in an inbox (0 when none).",
            ["inbox"],
            registry=r,
        )
        self.in_flight = Gauge(
            "hotfolder_in_flight_files", "Files claimed and not yet finished.", registry=r
        )
        self.last_success = Gauge(
            "hotfolder_last_success_timestamp_seconds",
            "When the last file of an inbox was published.",
            ["inbox"],
            registry=r,
        )
        self.latency = Histogram(
            "hotfolder_end_to_end_latency_seconds",
            "From a file being noticed to its outputs being published.",
            ["inbox"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "hotfolder_stage_seconds", "Time per file in each stage.", ["stage"],
            buckets=STAGE_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "hotfolder_batch_size", "Files per model call.", buckets=BATCH_BUCKETS, registry=r
        )
        self.inferences = Counter(
            "hotfolder_inferences", "Files run through the model.", registry=r
        )
        self.executions = Counter("hotfolder_executions", "Model calls (batches).", registry=r)
        self.oom_splits = Counter(
            "hotfolder_oom_splits", "Batches halved because they did not fit in device memory.",
            registry=r,
        )  # fmt: skip
        self.paused = Gauge(
            "hotfolder_intake_paused", "1 while intake is paused, by reason.", ["reason"],
            registry=r,
        )  # fmt: skip
        self.disk_free = Gauge(
            "hotfolder_disk_free_bytes", "Free space where each folder lives.",
            ["inbox", "folder"], registry=r,
        )  # fmt: skip
        self.gpu_memory = Gauge(
            "hotfolder_gpu_memory_bytes",
            "GPU memory held by the model's process (0 without a GPU).",
            ["kind"],
            registry=r,
        )
        self.observer_restarts = Counter(
            "hotfolder_observer_restarts", "Watchers restarted after dying.", ["inbox"],
            registry=r,
        )  # fmt: skip
        self.reloads = Counter(
            "hotfolder_config_reloads", "SIGHUP config reloads, by result.", ["result"],
            registry=r,
        )  # fmt: skip
        self.reload_ok = Gauge(
            "hotfolder_config_last_reload_successful",
            "0 if the last reload was refused (the previous config is still running).",
            registry=r,
        )
        self.reload_ok.set(1)
        for reason in PAUSE_REASONS:
            self.paused.labels(reason)
        for stage in STAGES:
            self.stage.labels(stage)
        for result in ("success", "failure"):
            self.reloads.labels(result)
        for kind in ("allocated", "reserved"):
            self.gpu_memory.labels(kind)

    def add_inbox(self, name: str) -> None:
        """Create an inbox's series up front, so dashboards show zeros rather than gaps."""
        for outcome in ("success", "failed"):
            self.processed.labels(name, outcome)
        for reason in Reason:
            self.failures.labels(name, reason.value)
        self.detected.labels(name)
        self.found_by_scan.labels(name)
        self.pending.labels(name)
        self.oldest_pending.labels(name)
        self.latency.labels(name)
        self.observer_restarts.labels(name)

    def stage_totals(self) -> dict[str, tuple[float, int]]:
        """Each stage's (total seconds, observations) since start, from ``hotfolder_stage_seconds``:
        one observation per file, but per batch for ``inference``."""
        totals: dict[str, list[float]] = {stage: [0.0, 0] for stage in STAGES}
        for family in self.stage.collect():
            for sample in family.samples:
                stage = sample.labels.get("stage", "")
                if stage in totals and sample.name.endswith("_sum"):
                    totals[stage][0] = sample.value
                elif stage in totals and sample.name.endswith("_count"):
                    totals[stage][1] = int(sample.value)
        return {stage: (seconds, int(count)) for stage, (seconds, count) in totals.items()}

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.client_timeout)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.server.metrics.exposition(), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            check = self.server.health if path == "/healthz" else self.server.readiness
            ok, details = check()
            body = json.dumps({"status": "ok" if ok else "failing", **details}, indent=1)
            self._send(200 if ok else 503, body.encode() + b"\n", "application/json")
        elif (page := self.server.pages(self.path)) is not None:
            self._send(*page)
        else:
            missing = b"not found: try /metrics, /healthz, /readyz or /status\n"
            self._send(404, missing, "text/plain")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def end_headers(self) -> None:
        # Here, not in _send: the server's own refusals (501, 414) are same-origin pages too.
        for header, value in SECURITY_HEADERS.items():
            self.send_header(header, value)
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass  # scrapes every few seconds would drown the log


class MetricsServer(ThreadingHTTPServer):
    """``/metrics``, ``/healthz`` (process, stages and watchers alive), ``/readyz`` (model
    warm, intake open) and the ``pages`` (the status page) on ``host:port``."""

    daemon_threads = True

    def __init__(
        self,
        listen: str,
        metrics: Metrics,
        health: Check,
        readiness: Check,
        pages: Pages = lambda target: None,
        client_timeout: float = 30.0,
    ) -> None:
        """Binds the address at once; raises ConfigError when it cannot (taken, not local).

        ``client_timeout`` (seconds) lets go of a client that sends nothing (or half a request)
        for that long: without it each such connection would hold a thread for ever. Scrapers
        and the status page ask and read within a second."""
        host, _, port = listen.rpartition(":")
        try:
            super().__init__((host.strip("[]") or "127.0.0.1", int(port)), _Handler)
        except OSError as exc:
            raise ConfigError(
                f"metrics.listen: cannot listen on {listen} ({exc.strerror}); each daemon on a "
                "host needs its own port: change metrics.listen or pass --metrics-listen HOST:PORT"
            ) from None
        self.metrics = metrics
        self.health = health
        self.readiness = readiness
        self.pages = pages
        self.client_timeout = client_timeout
        self._thread = threading.Thread(target=self.serve_forever, name="metrics", daemon=True)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A browser that leaves mid-answer (the status page's refresh, a thumbnail) is routine:
        # no traceback in the log for each one.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", self.server_address[0], self.port)

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
