"""The systemd units, and the notify protocol against our own socket at $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from . import corpus
from .conftest import ROOT
from .daemon import Site, http_get, metrics_url, photo_jpegs, stop, wait_for

UNITS = ["hotfolder.service", "hotfolder@.service"]
needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def installed_copy(unit: str, folder: Path) -> Path:
    """The unit as installed from this checkout: only the install prefix differs (verify checks
    that ExecStart exists). Template units are checked as instance 0."""
    text = (ROOT / "systemd" / unit).read_text().replace("/opt/hotfolder", str(ROOT))
    path = folder / unit.replace("@.", "@0.")
    path.write_text(text)
    return path


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies_cleanly(unit: str, tmp_path: Path) -> None:
    path = installed_copy(unit, tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True
    )
    # verify exits 0 even for unknown keys: any output at all is a finding.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_unit_exposure_is_low(unit: str, tmp_path: Path) -> None:
    path = installed_copy(unit, tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=25", str(path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    exposure = float(re.findall(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)[0])
    assert exposure <= 2.5


@pytest.mark.parametrize("unit", UNITS)
def test_unit_keeps_cuda_working(unit: str) -> None:
    text = (ROOT / "systemd" / unit).read_text()
    for setting in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "NoNewPrivileges=yes",
                    "ProtectSystem=strict", "DevicePolicy=closed", "DeviceAllow=char-nvidia-uvm rw",
                    "SystemCallFilter=@system-service", "CapabilityBoundingSet=\n"):  # fmt: skip
        assert setting in text
    for breaks_the_gpu in ("PrivateDevices=yes", "MemoryDenyWriteExecute=yes", "ProcSubset=pid"):
        assert breaks_the_gpu not in text


class NotifySocket:
    """A datagram socket standing in for systemd: records (time, message)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.running = True
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        while self.running:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sock.close()

    def count(self, message: str, since: float = 0.0) -> int:
        return sum(1 for at, m in self.messages if m == message and at >= since)


def test_notify_ready_watchdog_and_stopping(tmp_path: Path, photos: dict[str, np.ndarray]) -> None:
    site = Site(tmp_path / "site")
    site.write_config(daemon={"scan_interval_ms": 1000, "drain_timeout_ms": 30000, "workers": 2,
                              "stall_timeout_ms": 2000})  # fmt: skip
    notify = NotifySocket(tmp_path / "notify.sock")
    log = site.root / "log"
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
    with log.open("ab") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "hotfolder", "run", "--config", str(site.config)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(lambda: notify.count("READY=1") == 1, 60, "READY=1")
        # READY only after the model was loaded and warmed up.
        assert notify.messages[0][1] == "READY=1"
        assert b"warm-up" in log.read_bytes()
        wait_for(lambda: notify.count("WATCHDOG=1") >= 3, 10, "watchdog pings")

        # Wedge a stage for real: another process holds the journal's write lock, so the
        # intake blocks on its next journal write.
        url = metrics_url(log)
        blocker = sqlite3.connect(site.journal, timeout=1)
        blocker.execute("BEGIN EXCLUSIVE")
        corpus.write(site.inbox, "photo.jpg", photo_jpegs(photos, 1)[0])
        wait_for(lambda: http_get(url + "/healthz")[0] == 503, 30, "/healthz to fail")
        assert '"intake"' in http_get(url + "/healthz")[1]
        silent_from = time.monotonic() + 1.0  # a ping already on its way may still arrive
        wait_for(lambda: time.monotonic() > silent_from + 3.0, 10, "a quiet stretch")
        assert notify.count("WATCHDOG=1", since=silent_from) == 0
        blocker.rollback()
        blocker.close()
        recovered = time.monotonic()
        wait_for(lambda: notify.count("WATCHDOG=1", since=recovered) >= 2, 30, "pings to resume")
        wait_for(lambda: (site.done / "photo.jpg").exists(), 60, "the file processed")
    finally:
        assert stop(daemon) == 0
        notify.close()
    assert notify.messages[-1][1] == "STOPPING=1"
