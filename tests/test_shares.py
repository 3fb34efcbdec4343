"""Faults on a live daemon: a disk that fills up, a share that vanishes, an inbox deleted under it.

The daemon must stay up, say it is not ready and keep intake paused for as long as the trouble
lasts (the alert on ``hotfolder_intake_paused`` waits for minutes of it), do no work it could not
publish, and resume by itself, losing and repeating nothing. Every wait is a poll with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from . import corpus
from .conftest import ROOT
from .daemon import (
    Site,
    http_get,
    metric_value,
    metrics_url,
    photo_jpegs,
    start,
    stop,
    tmpfs,
    wait_for,
    wait_serving,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

WATCH_SECONDS = 30.0  # how long a fault is held and watched: three times the old pause cycle


def drop(folder: Path, images: list[bytes]) -> list[str]:
    names = [f"photo-{i:03d}.jpg" for i in range(len(images))]
    for name, data in zip(names, images, strict=True):
        corpus.write(folder, name, data)
    return names


def expected_outputs(names: list[str]) -> list[str]:
    stems = [name.rsplit(".", 1)[0] for name in names]
    return sorted([f"{stem}.png" for stem in stems] + [f"{stem}.mask.png" for stem in stems])


def scrape(url: str) -> tuple[str, int]:
    """The metrics exposition and the /readyz status, one after the other."""
    status, text = http_get(f"{url}/metrics")
    assert status == 200
    return text, http_get(f"{url}/readyz")[0]


def decodes(exposition: str) -> float:
    return metric_value(exposition, "hotfolder_stage_seconds_count", stage="decode")


def paused(exposition: str, reason: str) -> bool:
    return metric_value(exposition, "hotfolder_intake_paused", reason=reason) == 1


def watch_paused(url: str, reason: str, seconds: float) -> list[tuple[bool, int]]:
    """(paused for ``reason``, /readyz status) every 0.5 s for ``seconds``."""
    samples = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        exposition, ready = scrape(url)
        samples.append((paused(exposition, reason), ready))
        time.sleep(0.5)
    return samples


def assert_published_once(site: Site, names: list[str]) -> None:
    """Every file's original in done/ and its outputs in the outbox, each exactly once; one
    success in the journal per file."""
    assert site.files(site.done) == names
    assert site.files(site.outbox) == expected_outputs(names)
    rows = site.rows()
    outcomes = Counter((r["path"], r["outcome"]) for r in rows)
    assert outcomes == Counter({(name, "success"): 1 for name in names})


@pytest.fixture
def small_outbox(site: Site) -> Iterator[Path]:
    """The outbox on a 3 MB tmpfs (needs root, as CI has): it fills up long before 100 files."""
    with tmpfs(site.outbox, "3m") as outbox:
        yield outbox


def test_a_full_disk_keeps_intake_paused_until_space_is_back(
    site: Site, photos: dict[str, np.ndarray], small_outbox: Path
) -> None:
    site.write_config()
    names = drop(site.inbox, photo_jpegs(photos, 100, size=256))
    log = site.root / "log"
    daemon = start(site.config, log=log)
    try:
        url = metrics_url(log)
        wait_for(lambda: paused(scrape(url)[0], "disk_full"), 180, "intake to pause", 0.5)
        before = decodes(scrape(url)[0])
        samples = watch_paused(url, "disk_full", WATCH_SECONDS)
        after = decodes(scrape(url)[0])
        assert all(is_paused for is_paused, _ in samples), "intake resumed while the disk was full"
        assert {ready for _, ready in samples} == {503}, "ready while the disk was full"
        # Only decodes already running when the pause began may finish: one per decode worker.
        assert after - before <= 2
        published = len(site.files(site.done))
        assert published < len(names)
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_outbox)], check=True)
        wait_for(lambda: site.files(site.done) == names, 300, "every file published", 0.5)
        wait_for(lambda: scrape(url)[1] == 200, 30, "ready again", 0.5)
        assert not paused(scrape(url)[0], "disk_full")
    finally:
        assert stop(daemon) == 0
    assert_published_once(site, names)
    assert "intake resumed" in log.read_text()


def namespaces_work() -> bool:
    """A user and mount namespace can be made (no real root needed)."""
    probe = ["unshare", "--user", "--map-root-user", "--mount", "true"]
    try:
        return subprocess.run(probe, capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def share_command(site: Site, staged: Path, backing: Path) -> list[str]:
    """The daemon in a user and mount namespace of its own, its inbox a share: a folder on
    another filesystem (a tmpfs at ``backing``) bind-mounted over the inbox, holding the files
    of ``staged``. Only the namespace sees the share; outside, the inbox is the bare mountpoint."""
    share, inbox = shlex.quote(str(backing / "share")), shlex.quote(str(site.inbox))
    script = (
        f"set -e; mount -t tmpfs tmpfs {shlex.quote(str(backing))}; mkdir {share}; "
        f'cp {shlex.quote(str(staged))}/* {share}/; mount --bind {share} {inbox}; exec "$@"'
    )
    daemon = [sys.executable, "-m", "hotfolder", "run", "--config", str(site.config)]
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *daemon]


def assert_no_success_without_original(site: Site) -> None:
    rows = site.rows()
    assert [r["path"] for r in rows if r["outcome"] == "claimed"] == []
    archived = set(site.files(site.done))
    missing = [r["path"] for r in rows if r["outcome"] == "success" and r["path"] not in archived]
    assert missing == [], "journaled as success, original not in done/"


def test_a_share_that_vanishes_pauses_intake_until_it_is_back(
    site: Site, photos: dict[str, np.ndarray]
) -> None:
    if not namespaces_work():
        pytest.skip("cannot create a user and mount namespace here")
    site.write_config()
    staged, backing = site.root / "staged", site.root / "backing"
    names = drop(staged, photo_jpegs(photos, 40, size=256))
    backing.mkdir()
    site.inbox.mkdir()
    log = site.root / "log"
    with log.open("ab") as handle:
        daemon = subprocess.Popen(share_command(site, staged, backing), cwd=ROOT,
                                  stdout=handle, stderr=subprocess.STDOUT)  # fmt: skip

    def in_namespace(*command: str) -> None:
        enter = ["nsenter", "--target", str(daemon.pid), "--user", "--mount"]
        subprocess.run([*enter, *command], check=True, capture_output=True)

    try:
        url = metrics_url(log)
        wait_for(lambda: site.files(site.done), 240, "the first file published", 0.5)
        in_namespace("umount", "-l", str(site.inbox))  # the share drops with files in flight
        # /readyz turns 503 a moment before the pause's reason is exported: wait for both.
        wait_for(lambda: scrape(url)[1] == 503, 60, "not ready", 0.5)
        wait_for(lambda: paused(scrape(url)[0], "io_error"), 60, "paused for io_error", 0.5)
        samples = watch_paused(url, "io_error", 8)
        assert all(is_paused for is_paused, _ in samples)
        assert {ready for _, ready in samples} == {503}
        assert daemon.poll() is None
        assert list(site.inbox.iterdir()) == [], "created in the bare mountpoint"
        in_namespace("mount", "--bind", str(backing / "share"), str(site.inbox))
        wait_for(lambda: site.files(site.done) == names, 300, "every file published", 0.5)
        wait_for(lambda: scrape(url)[1] == 200, 30, "ready again", 0.5)
    finally:
        assert stop(daemon) == 0
    assert_published_once(site, names)
    assert_no_success_without_original(site)


def test_an_inbox_deleted_with_files_in_flight_never_stops_the_daemon(
    site: Site, photos: dict[str, np.ndarray]
) -> None:
    site.write_config()
    images = photo_jpegs(photos, 41, size=256)
    names = drop(site.inbox, images[:40])
    log = site.root / "log"
    daemon = start(site.config, log=log)
    try:
        wait_serving(log)
        wait_for(lambda: site.files(site.done), 240, "the first file published", 0.5)
        deleted = site.root / "deleted"
        os.rename(site.inbox, deleted)  # gone at once, as for rm -rf, however long it takes
        wait_for(lambda: not shutil.rmtree(deleted, ignore_errors=True) and not deleted.exists(),
                 60, "the deleted inbox removed")  # fmt: skip
        site.inbox.mkdir(exist_ok=True)
        corpus.write(site.inbox, "after.jpg", images[40])
        wait_for(lambda: (site.done / "after.jpg").exists(), 240, "a file in the new inbox")
        work = site.inbox / ".hotfolder" / "work"
        wait_for(lambda: not any(work.glob("*/*")), 60, "no job left in flight")
        assert daemon.poll() is None
    finally:
        assert stop(daemon) == 0
    assert_no_success_without_original(site)
    archived = site.files(site.done)
    assert set(archived) <= {*names, "after.jpg"}, "an original archived twice"


def test_a_daemon_started_while_the_disk_is_full_starts_paused(
    site: Site, photos: dict[str, np.ndarray], small_outbox: Path
) -> None:
    """Restarted (kill -9, a reboot) while the outbox is still full: it never reports ready,
    claims or decodes anything until space is back."""
    site.write_config()
    filler = small_outbox / ".filler"
    # Fill the outbox's filesystem to the last block.
    with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(bytes(64 * 1024))
    names = drop(site.inbox, photo_jpegs(photos, 6, size=256))
    log = site.root / "log"
    daemon = start(site.config, log=log)
    try:
        url = metrics_url(log)
        wait_serving(log)
        samples = watch_paused(url, "disk_full", 5.0)
        assert all(is_paused for is_paused, _ in samples), "intake open while the disk was full"
        assert {ready for _, ready in samples} == {503}, "ready while the disk was full"
        assert decodes(scrape(url)[0]) == 0
        assert site.visible_inbox_files() == names  # nothing claimed
        filler.unlink()
        wait_for(lambda: site.files(site.done) == names, 120, "every file published", 0.5)
    finally:
        assert stop(daemon) == 0
    assert_published_once(site, names)
