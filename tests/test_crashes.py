"""Processes that die: a ``kill -9`` never sends a good photo to errors/, and a file that really
kills the process each time ends in errors/ after ``max_attempts`` crashes, alone.

The daemon's fault-injection switch (``HOTFOLDER_FAULT_KILL_IN_MODEL``) makes a file that kills
the process with SIGKILL when it enters the model, as a GPU fault or a driver bug would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from . import corpus
from .daemon import (
    Site,
    kill,
    photo_jpegs,
    run_once,
    start,
    stop,
    tmpfs,
    wait_for,
    wait_serving,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]


def published(site: Site) -> int:
    return sum(1 for r in site.rows() if r["outcome"] == "success") if site.journal.exists() else 0


def test_repeated_kill_9_sends_no_good_photo_to_errors(
    site: Site, photos: dict[str, np.ndarray]
) -> None:
    """Five kills, each while batches are in the model, during a backlog of 60 photos."""
    site.write_config(settle_ms=100, batching={"max_batch_size": 8, "max_wait_ms": 200})
    images = photo_jpegs(photos, 60)
    names = [f"photo-{i:03d}.jpg" for i in range(60)]
    for name, data in zip(names, images, strict=True):
        corpus.write(site.inbox, name, data)
    log = site.root / "log"
    kills = 0
    for attempt in range(5):
        before = published(site)
        if before >= 50:
            break
        daemon = start(site.config, log=log)
        try:
            starts = attempt + 1
            wait_for(lambda n=starts: log.read_bytes().count(b" serving ") >= n, 120, "start")
            # Kill once this daemon has published a couple of files: its pipeline is full then.
            wait_for(lambda b=before: published(site) >= b + 2, 120, "files published")
        finally:
            kill(daemon)
        kills += 1
    assert kills == 5, "the backlog ran out before five kills"
    assert run_once(site.config, log) == 0
    assert site.files(site.errors) == []
    assert site.files(site.done) == names
    assert len(site.files(site.outbox)) == 2 * len(names)
    counts = Counter(r["path"] for r in site.rows() if r["outcome"] == "success")
    assert counts == Counter(names)
    assert "retrying alone" in log.read_text()


def test_a_file_that_kills_the_daemon_each_time_ends_in_errors_alone(
    site: Site, photos: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The killer shares a batch with good photos: they are published, it is charged only for
    the crashes it caused alone, and after max_attempts of those it is in errors/."""
    site.write_config(settle_ms=100, batching={"max_batch_size": 8, "max_wait_ms": 500},
                      daemon={"max_attempts": 2, "workers": 2})  # fmt: skip
    images = photo_jpegs(photos, 6)
    names = [f"good-{i}.jpg" for i in range(5)]
    for name, data in zip(names, images[:5], strict=True):
        corpus.write(site.inbox, name, data)
    corpus.write(site.inbox, "killer.jpg", images[5])
    monkeypatch.setenv("HOTFOLDER_FAULT_KILL_IN_MODEL", "killer")
    log = site.root / "log"
    codes = []
    while len(codes) < 6:  # as systemd's Restart=on-failure would
        codes.append(run_once(site.config, log))
        if codes[-1] != -signal.SIGKILL:
            break
    # In a batch (no charge), alone twice (charged twice), then refused before the model (and
    # `run --once` says a file failed).
    assert codes == [-signal.SIGKILL] * 3 + [1]
    assert site.files(site.done) == names
    report = json.loads((site.errors / "killer.jpg.error.json").read_text())
    assert report["reason"] == "repeated_failure"
    assert sorted(site.files(site.errors)) == ["killer.jpg", "killer.jpg.error.json"]


def test_a_suspect_that_is_fine_alone_is_published(
    site: Site, photos: dict[str, np.ndarray]
) -> None:
    """A daemon killed by the operator, its pipeline full, then left running: its suspects are
    retried alone first and published; nothing reaches errors/."""
    site.write_config(settle_ms=100)
    images = photo_jpegs(photos, 12)
    for i, data in enumerate(images):
        corpus.write(site.inbox, f"p-{i:02d}.jpg", data)
    log = site.root / "log"
    daemon = start(site.config, log=log)
    try:
        wait_for(lambda: published(site) >= 1, 120, "a first file")
    finally:
        kill(daemon)
    activity = list((site.inbox / ".hotfolder" / "activity").iterdir())
    assert len(activity) == 1, "the dead daemon left its activity log"
    daemon = start(site.config, log=log)
    try:
        wait_serving(log)
        wait_for(lambda: len(site.files(site.done)) == 12, 120, "every file")
    finally:
        assert stop(daemon) == 0
    assert site.files(site.errors) == []
    assert not (site.inbox / ".hotfolder" / "activity" / activity[0].name).exists()


def test_activity_log_of_a_dead_owner_blames_only_suspects(tmp_path: Path) -> None:
    """Unit level: which jobs of a dead daemon become suspects, and which are charged."""
    from hotfolder.claims import DECODED, ENCODE, MODEL, ClaimStore

    from .daemon import dead_owner

    root = tmp_path / "inbox"
    root.mkdir()
    dead = ClaimStore("products", root, owner=dead_owner())
    dead.open()
    claims = {}
    for name in ("waiting", "in-model", "encoding", "suspect-again"):
        (root / f"{name}.jpg").write_bytes(b"photo")
        claim = dead.claim(f"{name}.jpg", 1.0)
        assert claim is not None
        claims[name] = claim
    dead.note(DECODED, [claims["waiting"]])
    dead.note(MODEL, [claims["in-model"], claims["suspect-again"]])
    dead.note(ENCODE, [claims["encoding"]])
    dead._save(dataclasses.replace(claims["suspect-again"], solo=True))
    heir = ClaimStore("products", root)
    heir.open()
    adopted = {c.relative: c for c in heir.recover()}
    assert (adopted["waiting.jpg"].solo, adopted["waiting.jpg"].crashes) == (False, 0)
    assert (adopted["in-model.jpg"].solo, adopted["in-model.jpg"].crashes) == (True, 0)
    assert (adopted["encoding.jpg"].solo, adopted["encoding.jpg"].crashes) == (True, 0)
    assert (adopted["suspect-again.jpg"].solo, adopted["suspect-again.jpg"].crashes) == (True, 1)


def test_a_killer_keeps_its_crash_count_while_errors_is_full(
    site: Site, photos: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its time to go to errors/ comes while errors/ is full: it is kept, alone and counted,
    for a later start, never put back in line with good photos to kill the daemon again."""
    site.write_config(settle_ms=100, batching={"max_batch_size": 8, "max_wait_ms": 500},
                      daemon={"max_attempts": 2, "workers": 2})  # fmt: skip
    with tmpfs(site.errors, "64k"):
        images = photo_jpegs(photos, 4)
        names = [f"good-{i}.jpg" for i in range(3)]
        for name, data in zip(names, images[:3], strict=True):
            corpus.write(site.inbox, name, data)
        corpus.write(site.inbox, "killer.jpg", images[3])
        monkeypatch.setenv("HOTFOLDER_FAULT_KILL_IN_MODEL", "killer")
        log = site.root / "log"
        # In a batch (not charged), then alone twice (charged twice).
        codes = [run_once(site.config, log) for _ in range(3)]
        assert codes == [-signal.SIGKILL] * 3
        filler = site.errors / ".filler"
        with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(bytes(4096))
        # Its refusal cannot be written: it is kept in the work folder, counted; this run
        # stops paused (exit 1) with nothing lost.
        assert run_once(site.config, log) == 1
        assert "killer.jpg" not in site.visible_inbox_files()
        filler.unlink()
        assert run_once(site.config, log) == 1  # it goes to errors/, alone: no more kills
        report = json.loads((site.errors / "killer.jpg.error.json").read_text())
        assert report["reason"] == "repeated_failure"
        assert site.files(site.done) == names
