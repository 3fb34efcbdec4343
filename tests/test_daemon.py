"""`hotfolder run` end to end: real processes, the real model, real files and signals.

Every wait is a poll with a deadline; nothing sleeps for a fixed time to let the daemon work.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from . import corpus
from .daemon import (
    Site,
    dead_owner,
    kill,
    photo_jpegs,
    run_once,
    start,
    stop,
    tmpfs,
    wait_for,
    wait_serving,
)

pytestmark = pytest.mark.timeout(300)


def drop(folder: Path, images: list[bytes], prefix: str = "photo") -> list[str]:
    names = []
    for i, data in enumerate(images):
        name = f"{prefix}-{i:03d}.jpg"
        corpus.write(folder, name, data)
        names.append(name)
    return names


def assert_one_output_set(site: Site, relative: str) -> None:
    stem = relative.rsplit(".", 1)[0]
    with Image.open(site.outbox / f"{stem}.png") as cutout:
        assert cutout.mode == "RGBA"
        cutout.load()
    with Image.open(site.outbox / f"{stem}.mask.png") as mask:
        assert mask.mode == "L"


def test_once_drains_the_inbox(site: Site, photos: dict[str, np.ndarray]) -> None:
    # The empty and the truncated file are refused once unchanged for the grace time.
    site.write_config(inbox={"incomplete_grace_ms": 1000})
    images = photo_jpegs(photos, 40)
    good = []
    for i, folder in enumerate(["", "shoes", "shoes/red"]):
        chunk = images[i * 14 : (i + 1) * 14] if i < 2 else images[28:]
        good += [f"{folder}/{n}".lstrip("/") for n in drop(site.inbox / folder, chunk, f"p{i}")]
    assert len(good) == 40
    corpus.write(site.inbox, "bad/empty.jpg", b"")
    corpus.write(site.inbox, "bad/truncated.jpg", corpus.truncated_jpeg(photos["coffee"]))
    corpus.write(site.inbox, "bad/notes.jpg", b"not a photo at all\n" * 10)
    corpus.write(site.inbox, "bad/huge.png", corpus.png_claiming(100_000, 100_000))
    (site.inbox / "bad/passwd.jpg").symlink_to("/etc/passwd")

    assert run_once(site.config, site.root / "log") == 1  # five files failed

    assert site.visible_inbox_files() == []
    assert site.files(site.done) == sorted(good)
    outputs = site.files(site.outbox)
    assert len(outputs) == 80
    for relative in good:
        assert_one_output_set(site, relative)
    reasons = {}
    for sidecar in (site.errors / "bad").glob("*.error.json"):
        report = json.loads(sidecar.read_text())
        assert {"reason", "message", "attempts", "time", "host", "version"} <= report.keys()
        reasons[report["file"]] = report["reason"]
    assert reasons == {
        "bad/empty.jpg": "empty",
        "bad/truncated.jpg": "corrupt",
        "bad/notes.jpg": "unsupported_format",
        "bad/huge.png": "too_many_pixels",
        "bad/passwd.jpg": "not_a_file",
    }
    assert (site.errors / "bad/passwd.jpg").is_symlink()
    rows = site.rows()
    assert Counter(r["outcome"] for r in rows) == {"success": 40, "failed": 5}
    assert sorted(r["path"] for r in rows if r["outcome"] == "success") == sorted(good)
    for row in rows:
        if row["outcome"] == "success":
            assert len(str(row["sha256"])) == 64
            assert row["batch_size"]
            assert row["published_at"] >= row["claimed_at"]
    history = subprocess.run(
        [sys.executable, "-m", "hotfolder", "history", "--config", str(site.config), "--failed"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    lines = history.stdout.splitlines()
    assert len(lines) == 6  # a header and the five failures
    assert any("bad/huge.png: too_many_pixels: is 100000×100000" in line for line in lines)


def test_once_exits_1_when_a_file_failed(site: Site, photos: dict[str, np.ndarray]) -> None:
    """A cron job must be able to tell: 1 when some file went to errors/, 0 when none did."""
    site.write_config()
    first, second = photo_jpegs(photos, 2)
    corpus.write(site.inbox, "good.jpg", first)
    corpus.write(site.inbox, "corrupt.jpg", corpus.truncated_jpeg(photos["coffee"]))
    assert run_once(site.config, site.root / "log") == 1
    assert site.files(site.done) == ["good.jpg"]
    assert_one_output_set(site, "good.jpg")
    assert site.files(site.errors) == ["corrupt.jpg", "corrupt.jpg.error.json"]

    corpus.write(site.inbox, "second.jpg", second)
    assert run_once(site.config, site.root / "log") == 0
    assert site.files(site.done) == ["good.jpg", "second.jpg"]


def test_batches_fill_to_max_batch_size(site: Site, photos: dict[str, np.ndarray]) -> None:
    site.write_config(batching={"max_batch_size": 16, "max_wait_ms": 3000})
    drop(site.inbox, photo_jpegs(photos, 64, size=64))
    assert run_once(site.config, site.root / "log") == 0
    rows = site.rows()
    assert len(rows) == 64
    assert Counter(r["batch_size"] for r in rows) == {16: 64}


def test_live_daemon_takes_each_file_once_when_complete(
    site: Site, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    site.write_config(settle_ms=1500)
    images = photo_jpegs(photos, 6, size=128)
    corpus.write(site.inbox, "before-start.jpg", images[0])
    log = site.root / "log"
    daemon = start(site.config, log=log)
    try:
        wait_serving(log)
        wait_for(lambda: (site.done / "before-start.jpg").exists(), 60, "the file present at start")

        # Written in 5 chunks over 4 s: nothing may be published before the last chunk.
        data = images[1]
        chunks = [data[i * len(data) // 5 : (i + 1) * len(data) // 5] for i in range(5)]
        with (site.inbox / "slow.jpg").open("wb") as f:
            for i, chunk in enumerate(chunks):
                if i:
                    time.sleep(1.0)  # the writer's pace, not a wait for the daemon
                assert not (site.outbox / "slow.png").exists()
                f.write(chunk)
                f.flush()

        # An upload written under a temporary name, then renamed.
        corpus.write(site.inbox, "upload.jpg.part", images[2])
        os.rename(site.inbox / "upload.jpg.part", site.inbox / "upload.jpg")
        # mv from another folder on the same filesystem, and cp.
        outside = tmp_path / "outside"
        corpus.write(outside, "moved.jpg", images[3])
        shutil.move(outside / "moved.jpg", site.inbox / "moved.jpg")
        corpus.write(outside, "copied.jpg", images[4])
        subprocess.run(
            ["cp", str(outside / "copied.jpg"), str(site.inbox / "copied.jpg")], check=True
        )
        # A subfolder created after start.
        (site.inbox / "new-folder").mkdir()
        corpus.write(site.inbox, "new-folder/late.jpg", images[5])

        expected = ["before-start.jpg", "copied.jpg", "moved.jpg", "new-folder/late.jpg",
                    "slow.jpg", "upload.jpg"]  # fmt: skip
        wait_for(lambda: site.files(site.done) == expected, 90, "all six files in done/")
    finally:
        assert stop(daemon) == 0
    assert (site.done / "slow.jpg").read_bytes() == data
    assert "upload.jpg.part" not in site.files(site.errors)
    rows = site.rows()
    assert sorted(r["path"] for r in rows) == expected
    assert all(r["outcome"] == "success" for r in rows)
    for relative in expected:
        assert_one_output_set(site, relative)


class OutboxWatcher(threading.Thread):
    """Lists the outbox continuously; every file it ever sees must be a complete image with a
    final name (no temporary or hidden file, no partial PNG)."""

    def __init__(self, outbox: Path) -> None:
        super().__init__(daemon=True)
        self.outbox = outbox
        self.running = True
        self.problems: list[str] = []
        self.looks = 0

    def run(self) -> None:
        while self.running:
            for path in self.outbox.rglob("*") if self.outbox.exists() else []:
                if path.is_dir():
                    continue
                if path.name.startswith(".") or not path.name.endswith(".png"):
                    self.problems.append(f"unexpected name {path.name}")
                    continue
                try:
                    with Image.open(path) as image:
                        image.load()
                except FileNotFoundError:
                    continue
                except Exception as exc:
                    self.problems.append(f"{path.name}: {exc}")
            self.looks += 1


def test_kill_9_then_restart_publishes_each_file_once(
    site: Site, photos: dict[str, np.ndarray]
) -> None:
    site.write_config()
    names = drop(site.inbox, photo_jpegs(photos, 30))
    watcher = OutboxWatcher(site.outbox)
    watcher.start()
    log = site.root / "log"
    daemon = start(site.config, log=log)
    try:
        wait_for(lambda: len(site.files(site.done)) >= 4, 120, "the first files published")
    finally:
        kill(daemon)
    assert len(site.files(site.done)) < 30, "the kill came too late to test anything"
    assert run_once(site.config, log) == 0
    watcher.running = False
    watcher.join(10)
    assert watcher.looks > 10
    assert watcher.problems == []
    assert site.files(site.done) == names
    assert len(site.files(site.outbox)) == 60
    assert site.visible_inbox_files() == []
    rows = site.rows()
    assert sorted(r["path"] for r in rows if r["outcome"] == "success") == names
    assert all(r["outcome"] == "success" for r in rows)


def test_two_daemons_share_one_inbox(site: Site, photos: dict[str, np.ndarray]) -> None:
    site.write_config(settle_ms=500)
    logs = [site.root / "log-a", site.root / "log-b"]
    daemons = [start(site.config, log=log) for log in logs]
    try:
        for log in logs:
            wait_serving(log)
        names = drop(site.inbox, photo_jpegs(photos, 60, size=64))
        wait_for(lambda: len(site.files(site.done)) == 60, 180, "60 files in done/")
    finally:
        codes = [stop(d) for d in daemons]
    assert codes == [0, 0]
    assert site.files(site.done) == names
    assert len(site.files(site.outbox)) == 120
    rows = site.rows()
    assert sorted(r["path"] for r in rows) == names
    assert all(r["outcome"] == "success" for r in rows)
    published = [log.read_text().count(": success in ") for log in logs]
    assert sum(published) == 60
    # Each daemon's last words say where its time went: every file it published was decoded,
    # encoded and published once.
    for log, count in zip(logs, published, strict=True):
        stages = re.search(r"time by stage: (.*)", log.read_text())
        assert stages is not None
        for stage in ("decode", "encode", "publish"):
            assert re.search(rf"{stage} [\d.]+ s / {count} \(", stages[1]), stages[1]


def test_sigterm_mid_run_finishes_or_returns_every_file(
    site: Site, photos: dict[str, np.ndarray]
) -> None:
    site.write_config(daemon={"scan_interval_ms": 1000, "drain_timeout_ms": 20000, "workers": 2})
    names = drop(site.inbox, photo_jpegs(photos, 40))
    log = site.root / "log"
    daemon = start(site.config, log=log)
    wait_for(lambda: len(site.files(site.done)) >= 1, 120, "the first file published")
    # Exit 0 is the daemon's own word that it drained within drain_timeout_ms (else it exits
    # 1); the wall clock seen from here would also count a loaded machine's scheduling.
    assert stop(daemon, timeout=60) == 0
    assert "stopped cleanly" in log.read_text()
    done, back = site.files(site.done), site.visible_inbox_files()
    assert 0 < len(done) < 40
    assert sorted(done + back) == names
    assert site.files(site.inbox / ".hotfolder" / "work") == []
    for relative in done:
        assert_one_output_set(site, relative)
    rows = site.rows()
    assert sorted(r["path"] for r in rows) == done  # returned files left no journal row


def test_inbox_deleted_and_recreated_keeps_working(
    site: Site, photos: dict[str, np.ndarray]
) -> None:
    site.write_config()
    images = photo_jpegs(photos, 2)
    log = site.root / "log"
    daemon = start(site.config, log=log)
    try:
        wait_serving(log)
        corpus.write(site.inbox, "first.jpg", images[0])
        wait_for(lambda: (site.done / "first.jpg").exists(), 60, "the first file")
        jobs = site.inbox / ".hotfolder" / "work"
        wait_for(lambda: not any(jobs.glob("*/*")), 60, "the first job's folder removed")
        shutil.rmtree(site.inbox)
        site.inbox.mkdir()
        corpus.write(site.inbox, "second.jpg", images[1])
        wait_for(lambda: (site.done / "second.jpg").exists(), 60, "a file in the new inbox")
    finally:
        assert stop(daemon) == 0
    assert "restarting it" in log.read_text()


def test_a_failing_stage_stops_the_daemon_and_keeps_the_file(
    site: Site, photos: dict[str, np.ndarray]
) -> None:
    site.write_config()
    log = site.root / "log"
    daemon = start(site.config, log=log)
    wait_serving(log)
    site.errors.rmdir()
    site.errors.write_text("a file where the errors folder should be")
    corpus.write(site.inbox, "notes.jpg", b"not a photo\n")
    assert daemon.wait(timeout=60) == 1  # exits non-zero: systemd restarts it
    assert "stage decode-" in log.read_text()
    work = site.files(site.inbox / ".hotfolder" / "work")
    assert any(path.endswith("/source") for path in work), "the file is kept"
    site.errors.unlink()
    assert run_once(site.config, log) == 1  # the file went to errors/
    report = json.loads((site.errors / "notes.jpg.error.json").read_text())
    assert report["reason"] == "unsupported_format"
    # Decoded again by the next daemon, and not charged for the crash: it was not in the model
    # when the process stopped (only crashes while a file is alone count towards errors/).
    assert report["attempts"] == 1


def test_a_file_that_keeps_crashing_the_daemon_goes_to_errors(
    site: Site, photos: dict[str, np.ndarray]
) -> None:
    """Left behind by a daemon that died with it three times: the next one gives up on it."""
    site.write_config()
    folder = site.inbox / ".hotfolder" / "work" / dead_owner() / "0123456789abcdef"
    corpus.write(folder, "source", photo_jpegs(photos, 1)[0])
    record = {
        "job_id": "0123456789abcdef", "inbox": "products", "relative": "shoes/boom.jpg",
        "size": 1, "detected_at": 1.0, "claimed_at": 2.0, "attempts": 3, "outcome": "",
        "solo": True, "crashes": 3,
    }  # fmt: skip
    (folder / "job.json").write_text(json.dumps(record))
    assert run_once(site.config, site.root / "log") == 1
    report = json.loads((site.errors / "shoes/boom.jpg.error.json").read_text())
    assert report["reason"] == "repeated_failure"
    assert report["attempts"] == 3
    assert (site.errors / "shoes/boom.jpg").is_file()
    assert [r["outcome"] for r in site.rows()] == ["failed"]


@pytest.mark.parametrize(("outcome", "archive"), [("success", "done"), ("failed", "errors")])
def test_a_job_killed_while_archiving_keeps_its_original(
    site: Site, photos: dict[str, np.ndarray], outcome: str, archive: str
) -> None:
    """Killed after its outcome was recorded, before the original left the work folder: the next
    daemon finishes the move instead of discarding the file."""
    site.write_config()
    folder = site.inbox / ".hotfolder" / "work" / dead_owner() / "fedcba9876543210"
    corpus.write(folder, "source", photo_jpegs(photos, 1)[0])
    record = {
        "job_id": "fedcba9876543210", "inbox": "products", "relative": "shoes/last.jpg",
        "size": 1, "detected_at": 1.0, "claimed_at": 2.0, "attempts": 1, "outcome": outcome,
    }  # fmt: skip
    (folder / "job.json").write_text(json.dumps(record))
    assert run_once(site.config, site.root / "log") == (1 if outcome == "failed" else 0)
    assert site.files(site.root / archive) == ["shoes/last.jpg"]
    assert not folder.parent.exists()
    assert [r["outcome"] for r in site.rows()] == [outcome]


@pytest.fixture
def tiny_outbox(site: Site) -> Iterator[Path]:
    """The outbox on a 4 KiB tmpfs (needs root, as CI has): writes fail with ENOSPC."""
    with tmpfs(site.outbox, "4k") as outbox:
        yield outbox


def test_full_outbox_pauses_intake_and_loses_nothing(
    site: Site, photos: dict[str, np.ndarray], tiny_outbox: Path
) -> None:
    site.write_config()
    names = drop(site.inbox, photo_jpegs(photos, 3, size=256))
    log = site.root / "log"
    daemon = start(site.config, log=log)
    try:
        wait_for(lambda: b"intake paused" in log.read_bytes(), 60, "intake to pause")
        wait_for(lambda: site.visible_inbox_files() == names, 30, "files back in the inbox")
        assert site.files(site.done) == []
        # Space is back on the same filesystem (an unmounted outbox would be a share gone).
        subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_outbox)], check=True)
        wait_for(lambda: site.files(site.done) == names, 90, "processing to resume")
    finally:
        assert stop(daemon) == 0
    for name in names:
        assert_one_output_set(site, name)


def test_hostile_names_and_special_files_never_stop_the_daemon(
    site: Site, photos: dict[str, np.ndarray]
) -> None:
    site.write_config()
    image = photo_jpegs(photos, 1, size=64)[0]
    names = [
        "with spaces (1).jpg",
        unicodedata.normalize("NFC", "café.jpg"),
        unicodedata.normalize("NFD", "café.jpg"),  # a different file name on Linux
        "line\nbreak.jpg",
        "x" * 251 + ".jpg",  # 255 bytes: the longest name a file can have
        "a/same.jpg",
        "b/same.jpg",
        "folder.jpg/inside.jpg",  # a folder with an image's name
    ]
    for name in names:
        corpus.write(site.inbox, name, image)
    long_and_bad = "y" * 251 + ".jpg"
    corpus.write(site.inbox, long_and_bad, b"not a photo")
    os.mkfifo(site.inbox / "pipe.jpg")
    (site.inbox / "link.jpg").symlink_to(site.inbox / "with spaces (1).jpg")
    corpus.write(
        site.inbox,
        "cmyk.jpg",
        corpus.encoded(Image.fromarray(photos["coffee"]).convert("CMYK"), "JPEG"),
    )
    corpus.write(site.inbox, "gray16.png", corpus.encoded(Image.fromarray(
        photos["coffee"][:, :, 0].astype(np.uint16) * 257), "PNG"))  # fmt: skip
    corpus.write(site.inbox, "animated.webp", corpus.encoded(
        Image.fromarray(photos["coffee"]), "WEBP", save_all=True,
        append_images=[Image.fromarray(photos["coffee"][::-1].copy())]))  # fmt: skip

    assert run_once(site.config, site.root / "log") == 1  # four files failed

    good = sorted([*names, "cmyk.jpg", "gray16.png"])
    assert site.files(site.done) == good
    assert site.visible_inbox_files() == []
    for name in good:
        stem = name.rsplit(".", 1)[0].replace("\n", "_")
        if len(stem.encode()) > 245:
            stem = stem.encode()[: 255 - len(".mask.png")].decode()
        assert (site.outbox / f"{stem}.mask.png").is_file(), name
    reasons = {}
    for sidecar in site.errors.glob("*.error.json"):
        report = json.loads(sidecar.read_text())
        reasons[report["file"]] = report["reason"]
    assert reasons == {
        "pipe.jpg": "not_a_file",
        "link.jpg": "not_a_file",
        "animated.webp": "unsupported_format",
        long_and_bad: "unsupported_format",  # its report's name is shortened to fit
    }
    assert (site.errors / long_and_bad).is_file()


def test_polling_watcher_for_network_shares(site: Site, photos: dict[str, np.ndarray]) -> None:
    site.write_config(daemon={"scan_interval_ms": 60000, "drain_timeout_ms": 30000, "workers": 2})
    config = yaml.safe_load(site.config.read_text())
    config["inboxes"][0]["polling"] = True
    site.config.write_text(yaml.safe_dump(config))
    log = site.root / "log"
    daemon = start(site.config, log=log)
    images = photo_jpegs(photos, 2)
    try:
        wait_serving(log)
        corpus.write(site.inbox, "first.jpg", images[0])
        wait_for(lambda: (site.done / "first.jpg").exists(), 30, "a first file")
        # The start-up scan is over and the next one is a minute away: only the polling
        # observer can see this file.
        corpus.write(site.inbox, "share/photo.jpg", images[1])
        wait_for(lambda: (site.done / "share/photo.jpg").exists(), 30, "the polled file")
    finally:
        assert stop(daemon) == 0
    assert "with polling" in log.read_text()
