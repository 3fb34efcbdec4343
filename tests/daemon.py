"""Running real daemon processes in tests: config, start, wait with deadlines, inspect results."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from . import corpus
from .conftest import ROOT, WEIGHTS


@dataclass
class Site:
    """A daemon's folders and config under one test folder."""

    root: Path

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def done(self) -> Path:
        return self.root / "done"

    @property
    def errors(self) -> Path:
        return self.root / "errors"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def journal(self) -> Path:
        return self.root / "journal.sqlite3"

    def write_config(
        self, settle_ms: int = 300, inbox: dict[str, object] | None = None, **sections: object
    ) -> Path:
        """The config file; ``inbox`` adds or replaces keys of the one inbox, ``sections``
        replace top-level sections."""
        config: dict[str, object] = {
            "model": {"weights": str(WEIGHTS), "device": "cpu"},
            "batching": {"max_batch_size": 8, "max_wait_ms": 50},
            "daemon": {"scan_interval_ms": 1000, "drain_timeout_ms": 30000, "workers": 2},
            "journal": str(self.journal),
            "metrics": {"listen": "127.0.0.1:0"},  # any free port; the log says which
            "inboxes": [
                {
                    "name": "products",
                    "path": str(self.inbox),
                    "outbox": str(self.outbox),
                    "done": str(self.done),
                    "errors": str(self.errors),
                    "settle_ms": settle_ms,
                    "outputs": [{"kind": "cutout"}, {"kind": "mask"}],
                    **(inbox or {}),
                }
            ],
        }
        for key, value in sections.items():
            config[key] = value
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(config))
        return self.config

    def files(self, folder: Path) -> list[str]:
        """Relative paths of every file and link (not folder) under ``folder``, hidden ones
        included. A folder the daemon deletes while it is listed (a finished job's) is skipped,
        as os.walk does, instead of failing the listing."""
        found = []
        for parent, folders, names in os.walk(folder):
            links = [f for f in folders if os.path.islink(os.path.join(parent, f))]
            for name in [*names, *links]:
                path = Path(parent, name)
                if path.is_file() or path.is_symlink():
                    found.append(str(path.relative_to(folder)))
        return sorted(found)

    def visible_inbox_files(self) -> list[str]:
        return [f for f in self.files(self.inbox) if not f.startswith(".hotfolder")]

    def rows(self) -> list[dict[str, object]]:
        """Every job row; none while the daemon has not created its journal yet. Read-only
        and closed at once, so that polling it never stands in the daemon's way."""
        if not self.journal.exists():
            return []
        uri = f"{self.journal.as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as db:
            db.row_factory = sqlite3.Row
            try:
                return [dict(r) for r in db.execute("SELECT * FROM jobs")]
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):  # created, its schema not written yet
                    return []
                raise


@contextlib.contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. "3m") mounted on ``folder`` for the block, unmounted after;
    it needs root, as CI has, and skips the test elsewhere."""
    folder.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                           capture_output=True, text=True)  # fmt: skip
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def photo_jpegs(photos: dict[str, np.ndarray], count: int, size: int = 96) -> list[bytes]:
    """``count`` small, different JPEGs cut from real photos."""
    from PIL import Image

    sources = list(photos.values())
    images = []
    for i in range(count):
        photo = sources[i % len(sources)]
        y, x = (i * 7) % 100, (i * 13) % 100
        crop = Image.fromarray(photo[y : y + 250, x : x + 250]).resize((size, size))
        images.append(corpus.jpeg(np.asarray(crop)))
    return images


def start(
    config: Path, *args: str, log: Path, prefix: tuple[str, ...] = (), umask: int = -1
) -> subprocess.Popen[bytes]:
    """A daemon process; ``prefix`` runs it through another command (``setpriv …``)."""
    command = [*prefix, sys.executable, "-m", "hotfolder", "run", "--config", str(config), *args]
    with log.open("ab") as handle:  # the child keeps its own descriptor
        return subprocess.Popen(
            command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, umask=umask
        )


def without_root_powers() -> tuple[str, ...]:
    """A command prefix under which even root obeys file permissions (no CAP_DAC_OVERRIDE or
    CAP_DAC_READ_SEARCH), so a file of mode 000 is unreadable as it is for any user."""
    if os.geteuid() != 0:
        return ()
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search")


def run_once(config: Path, log: Path, timeout: float = 240) -> int:
    process = start(config, "--once", log=log)
    return process.wait(timeout=timeout)


def wait_for(
    condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_serving(log: Path, timeout: float = 60) -> None:
    wait_for(lambda: log.exists() and b"serving" in log.read_bytes(), timeout, "daemon start")


def stop(process: subprocess.Popen[bytes], timeout: float = 60) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.wait(timeout=timeout)


def dead_owner() -> str:
    """A claim-owner name of this host whose process has already exited."""
    code = "from hotfolder.claims import owner_name; print(owner_name())"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def kill(process: subprocess.Popen[bytes]) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def metrics_url(log: Path, timeout: float = 60) -> str:
    """The daemon's metrics address, from its start-up log line (it listens on port 0)."""
    pattern = re.compile(rb"metrics on (http://[\d.]+:\d+)/metrics")
    found: list[str] = []

    def announced() -> bool:
        match = pattern.search(log.read_bytes()) if log.exists() else None
        if match:
            found.append(match.group(1).decode())
        return bool(match)

    wait_for(announced, timeout, "the metrics server")
    return found[0]


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metric_value(exposition: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition, by name and labels."""
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"{name}{labels} not in the exposition")
