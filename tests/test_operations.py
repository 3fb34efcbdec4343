"""Operating the daemon: metrics and health endpoints, SIGHUP reloads, JSON logs."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml

from hotfolder import cpuinfo, quantized

from . import corpus
from .daemon import (
    Site,
    http_get,
    metric_value,
    metrics_url,
    photo_jpegs,
    start,
    stop,
    wait_for,
    wait_serving,
)

pytestmark = pytest.mark.timeout(300)


def test_metrics_health_and_readiness(site: Site, photos: dict[str, np.ndarray]) -> None:
    site.write_config()
    log = site.root / "log"
    daemon = start(site.config, "--log-format", "json", log=log)
    try:
        url = metrics_url(log)
        wait_serving(log)
        for i, data in enumerate(photo_jpegs(photos, 3)):
            corpus.write(site.inbox, f"p{i}.jpg", data)
        corpus.write(site.inbox, "notes.jpg", b"not a photo")
        wait_for(lambda: len(site.files(site.done)) == 3, 60, "three files published")
        wait_for(lambda: "notes.jpg" in site.files(site.errors), 30, "the bad file in errors/")
        status, body = http_get(url + "/metrics")
        assert status == 200

        def value(name: str, **labels: str) -> float:
            return metric_value(body, name, **labels)

        inbox = "products"
        assert value("hotfolder_files_processed_total", inbox=inbox, outcome="success") == 3
        assert value("hotfolder_files_processed_total", inbox=inbox, outcome="failed") == 1
        assert value("hotfolder_failures_total", inbox=inbox, reason="unsupported_format") == 1
        assert value("hotfolder_failures_total", inbox=inbox, reason="corrupt") == 0
        assert value("hotfolder_files_detected_total", inbox=inbox) == 4
        assert value("hotfolder_end_to_end_latency_seconds_count", inbox=inbox) == 3
        assert value("hotfolder_inferences_total") == 3
        assert value("hotfolder_batch_size_count") == value("hotfolder_executions_total") >= 1
        assert value("hotfolder_stage_seconds_count", stage="decode") == 3
        assert value("hotfolder_ready") == 1
        assert value("hotfolder_in_flight_files") == 0
        assert value("hotfolder_build_info", model="u2netp", version="0.1.0") == 1
        # precision auto on the CPU: int8-mixed for the shipped weights where it is faster
        precision = "int8-mixed" if cpuinfo.vector_isa() in quantized.FASTER_ON else "fp32"
        assert value("hotfolder_device_info", device="cpu", precision=precision) == 1
        assert value("hotfolder_model_warmup_seconds") > 0
        assert value("hotfolder_disk_free_bytes", inbox=inbox, folder="outbox") > 0
        assert value("hotfolder_gpu_memory_bytes", kind="allocated") == 0
        assert "p0.jpg" not in body  # file names are never labels
        for path in ("/healthz", "/readyz"):
            status, text = http_get(url + path)
            assert status == 200
            assert json.loads(text)["status"] == "ok"
    finally:
        assert stop(daemon) == 0
    # One JSON line per job, with its outcome and stage timings.
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    jobs = [r for r in records if r.get("outcome") == "success"]
    assert sorted(r["path"] for r in jobs) == ["p0.jpg", "p1.jpg", "p2.jpg"]
    assert set(jobs[0]["stages_ms"]) == {"decode", "queue", "inference", "encode", "publish"}
    failed = [r for r in records if r.get("outcome") == "failed"]
    assert [(r["path"], r["reason"], r["level"]) for r in failed] == [
        ("notes.jpg", "unsupported_format", "WARNING")
    ]


def test_sighup_applies_a_valid_config_and_refuses_an_invalid_one(
    site: Site, photos: dict[str, np.ndarray]
) -> None:
    site.write_config()
    log = site.root / "log"
    daemon = start(site.config, log=log)
    images = photo_jpegs(photos, 10)
    try:
        url = metrics_url(log)
        wait_serving(log)
        first = [f"a{i}.jpg" for i in range(6)]
        for name, data in zip(first, images, strict=False):
            corpus.write(site.inbox, name, data)

        # Mid-run: a mask for every file from now on, and a second inbox.
        config = yaml.safe_load(site.config.read_text())
        config["inboxes"][0]["outputs"] = [
            {"kind": "cutout"},
            {"kind": "mask"},
            {"kind": "composite"},
        ]
        config["inboxes"].append({
            "name": "people", "path": str(site.root / "people"),
            "outbox": str(site.root / "people-out"), "done": str(site.root / "people-done"),
            "errors": str(site.root / "people-errors"), "settle_ms": 300,
        })  # fmt: skip
        config["batching"] = {"max_batch_size": 4, "max_wait_ms": 10}
        site.config.write_text(yaml.safe_dump(config))
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: b"config reloaded" in log.read_bytes(), 30, "the reload")
        corpus.write(site.root / "people", "face.jpg", images[6])
        corpus.write(site.inbox, "after.jpg", images[7])
        wait_for(lambda: (site.root / "people-done" / "face.jpg").exists(), 60, "the new inbox")
        wait_for(lambda: len(site.files(site.done)) == 7, 60, "every file of the first inbox")
        assert (site.outbox / "after.jpg").exists()  # the new composite output
        assert (site.outbox / "after.mask.png").exists()
        assert (site.root / "people-out" / "face.png").exists()

        # An invalid config is refused; the running one keeps working.
        site.config.write_text(site.config.read_text() + "colour: mauve\n")
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: b"config reload refused" in log.read_bytes(), 30, "the refusal")
        _, body = http_get(url + "/metrics")
        assert metric_value(body, "hotfolder_config_last_reload_successful") == 0
        assert metric_value(body, "hotfolder_config_reloads_total", result="failure") == 1
        assert metric_value(body, "hotfolder_config_reloads_total", result="success") == 1
        corpus.write(site.inbox, "still.jpg", images[8])
        wait_for(lambda: (site.outbox / "still.mask.png").exists(), 60, "processing to go on")
    finally:
        assert stop(daemon) == 0
    assert "colour: unknown key" in log.read_text()
    assert site.files(site.done) == sorted([*first, "after.jpg", "still.jpg"])
    rows = site.rows()
    assert sorted(r["path"] for r in rows) == sorted([*first, "after.jpg", "still.jpg", "face.jpg"])
    assert all(r["outcome"] == "success" for r in rows)


def test_a_taken_metrics_port_is_a_config_error(site: Site) -> None:
    """Another process listens on the port (a second daemon with the same config): exit 2 with
    one line saying which setting to change, and nothing created in the inbox."""
    site.write_config()
    log = site.root / "log"
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        address = f"127.0.0.1:{other.getsockname()[1]}"
        daemon = start(site.config, "--metrics-listen", address, log=log)
        assert daemon.wait(timeout=120) == 2
    text = log.read_text()
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert len(errors) == 1, text
    for needed in (address, "metrics.listen", "--metrics-listen"):
        assert needed in errors[0]
    assert site.files(site.inbox) == []


def test_json_logs_hold_only_json_and_a_clean_stop_logs_no_error(
    site: Site, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """Started on a new inbox (its work folders appear while it is watched) and stopped right
    after files left the inbox (watchdog holds such a move for half a second to pair it)."""
    site.write_config()
    log = site.root / "log"
    corpus.write(site.inbox, "upload.tmp", b"an upload the user takes back")
    daemon = start(site.config, "--log-format", "json", log=log)
    try:
        wait_serving(log)
        corpus.write(site.inbox, "shoes/p0.jpg", photo_jpegs(photos, 1)[0])
        wait_for(lambda: site.files(site.done) == ["shoes/p0.jpg"], 60, "the photo published")
        (site.inbox / "upload.tmp").rename(tmp_path / "upload.tmp")
    finally:
        assert stop(daemon) == 0
    lines = log.read_text().splitlines()
    records = [json.loads(line) for line in lines if _json_object(line)]
    assert [line for line in lines if not _json_object(line)] == []
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert [r for r in records if r["level"] in ("ERROR", "CRITICAL")] == []
    assert records[-1]["message"] == "stopped cleanly"


def _json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
