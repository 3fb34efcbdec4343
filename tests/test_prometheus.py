"""A real Prometheus server scrapes a working daemon: every dashboard query returns data, every
alert rule evaluates, promtool accepts the exposition and the alert unit tests pass."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import urllib.parse
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import yaml

from . import corpus
from .conftest import ROOT
from .daemon import Site, http_get, metrics_url, photo_jpegs, start, stop, wait_for, wait_serving

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        shutil.which("prometheus") is None or shutil.which("promtool") is None,
        reason="Prometheus is not installed (scripts/test installs Debian's prometheus)",
    ),
]
DASHBOARD = ROOT / "grafana" / "hotfolder.json"
ALERTS = ROOT / "prometheus" / "alerts.yml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every panel target, with the dashboard variables filled in as
    Grafana would for "All inboxes"."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$inbox", ".*").replace("$__rate_interval", "1m")
            queries.append((panel["title"], expr))
    return queries


def query(base: str, expr: str) -> list[dict[str, object]]:
    status, body = http_get(f"{base}/api/v1/query?query={urllib.parse.quote(expr)}")
    answer = json.loads(body)
    assert status == 200, answer
    assert answer["status"] == "success", answer
    return answer["data"]["result"]  # type: ignore[no-any-return]


def scrapes(base: str, count: int) -> bool:
    """Prometheus has scraped the daemon at least ``count`` times in the last minute."""
    result = query(base, 'count_over_time(up{job="hotfolder"}[1m])')
    return bool(result) and float(result[0]["value"][1]) >= count  # type: ignore[index]


@pytest.fixture
def daemon_site(tmp_path: Path, photos: dict[str, np.ndarray]) -> Iterator[tuple[Site, str]]:
    """A live daemon that has published files and rejected one."""
    site = Site(tmp_path / "site")
    site.write_config()
    log = site.root / "log"
    daemon = start(site.config, log=log)
    try:
        url = metrics_url(log)
        wait_serving(log)
        yield site, url
    finally:
        assert stop(daemon) == 0


@pytest.fixture
def prometheus(tmp_path: Path, daemon_site: tuple[Site, str]) -> Iterator[str]:
    """Prometheus on loopback scraping the daemon every second, with our alert rules."""
    _, url = daemon_site
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "hotfolder", "static_configs": [{"targets": [url.split("//")[1]]}]}
        ],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    with (tmp_path / "prometheus.log").open("wb") as log:
        server = subprocess.Popen(
            ["prometheus", f"--config.file={config_file}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(base + "/-/ready"), 60, "Prometheus to start")
        yield base
    finally:
        server.terminate()
        server.wait(30)


def unix_time(rfc3339: str) -> float:
    """Seconds since the epoch of a timestamp in Prometheus's API (RFC 3339, UTC)."""
    return datetime.fromisoformat(rfc3339).timestamp()


def _answers(url: str) -> bool:
    try:
        return http_get(url)[0] == 200
    except OSError:
        return False


def test_dashboard_and_alerts_against_a_real_prometheus(
    daemon_site: tuple[Site, str], prometheus: str, photos: dict[str, np.ndarray]
) -> None:
    site, _ = daemon_site
    # rate() needs the counters seen before the files arrive, not only after.
    wait_for(lambda: scrapes(prometheus, 2), 30, "the first scrapes", interval=0.2)
    for i, data in enumerate(photo_jpegs(photos, 6)):
        corpus.write(site.inbox, f"shoes/p{i}.jpg", data)
    corpus.write(site.inbox, "shoes/notes.jpg", b"not a photo")
    wait_for(lambda: len(site.files(site.done)) == 6, 90, "six files published")

    scraped_at: list[float] = []  # Prometheus's clock when it first held all seven

    def scraped_all() -> bool:
        result = query(prometheus, "sum(hotfolder_files_processed_total)")
        if not result or float(result[0]["value"][1]) != 7:  # type: ignore[index]
            return False
        scraped_at.append(float(result[0]["value"][0]))  # type: ignore[index]
        return True

    wait_for(scraped_all, 60, "Prometheus to scrape the results", interval=0.5)
    wait_for(lambda: scrapes(prometheus, 8), 30, "a few scrapes for rate()", interval=0.5)

    for title, expr in dashboard_queries():
        result = query(prometheus, expr)
        assert result, f"panel {title!r}: no data for {expr}"
        values = [float(series["value"][1]) for series in result]  # type: ignore[index]
        assert any(math.isfinite(v) for v in values), f"panel {title!r}: {expr} gave {values}"

    # The corrupt file fails at once while the photos are still in the model, so for a few
    # evaluations 1 file in 1 has failed and HotfolderFailureRatioHigh is pending (its `for:`
    # keeps it from firing). Alerts are judged on an evaluation that saw all seven files.
    def rules_evaluated() -> bool:
        _, body = http_get(f"{prometheus}/api/v1/rules")
        groups = json.loads(body)["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        final = all(unix_time(g["lastEvaluation"]) > scraped_at[0] for g in groups)
        return final and len(rules) == 7 and all(r["health"] == "ok" for r in rules)

    wait_for(rules_evaluated, 30, "every alert rule to evaluate the final numbers without error")
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            query(prometheus, rule["expr"])  # valid PromQL on real data
    _, body = http_get(f"{prometheus}/api/v1/alerts")
    firing = [a["labels"]["alertname"] for a in json.loads(body)["data"]["alerts"]]
    assert firing == [], "a healthy daemon raises no alert"


def test_promtool_accepts_the_exposition(daemon_site: tuple[Site, str]) -> None:
    _, url = daemon_site
    _, exposition = http_get(url + "/metrics")
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_alert_rules_unit_tests() -> None:
    result = subprocess.run(
        ["promtool", "test", "rules", "alerts_test.yml"],
        cwd=ROOT / "prometheus", capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    check = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
