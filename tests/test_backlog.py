"""Backlogs: a step's work follows what happened, not how many files wait; none is missed.

The watcher is driven with an explicit clock on real files, with real system calls counted (the
watcher's cost is its ``stat``/``lstat``/``scandir`` calls; nothing is timed)."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hotfolder import recipes, scan
from hotfolder.config import InboxConfig
from hotfolder.watch import CHANGED, CLOSED, OPENED, RESCAN, InboxWatcher

from . import corpus
from .daemon import Site, photo_jpegs, start, stop, wait_for

FOLDER_SIZE = 100
LIMIT = 100  # files tracked at most, far below the backlogs


class Calls:
    """Counts the file system calls the watcher makes (it calls them through ``os``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for name in ("lstat", "stat", "scandir"):
            monkeypatch.setattr(os, name, self._counting(getattr(os, name)))

    def _counting(self, call: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return call(*args, **kwargs)

        return counted

    def during(self, action: Callable[[], Any]) -> tuple[int, Any]:
        before = self.count
        result = action()
        return self.count - before, result


def inbox(tmp_path: Path, limit: int | None = LIMIT) -> InboxWatcher:
    config = InboxConfig(
        name="t", path=tmp_path / "in", outbox=tmp_path / "out", done=tmp_path / "done",
        errors=tmp_path / "err", settle_ms=1000, outputs=(recipes.Output(recipes.Kind.CUTOUT),),
    )  # fmt: skip
    config.path.mkdir()
    bound = {} if limit is None else {"limit": limit}  # None: the daemon's own
    w = InboxWatcher(config, scan_interval=10.0, observe=False, **bound)
    w.start()
    return w


def backlog(root: Path, count: int) -> list[str]:
    keys = [f"f{i // FOLDER_SIZE:03d}/p{i:05d}.jpg" for i in range(count)]
    for folder in {key.split("/")[0] for key in keys}:
        (root / folder).mkdir()
    for key in keys:
        (root / key).write_bytes(b"x")
    return keys


class Claimer:
    """Takes what the watcher hands out, as the service does: moves it out of the inbox."""

    def __init__(self, w: InboxWatcher, to: Path) -> None:
        self.w, self.to = w, to
        to.mkdir()
        self.taken: list[str] = []

    def step(self, now: float) -> int:
        ready = self.w.step(now)
        for item in ready:
            os.rename(self.w.root / item.relative, self.to / item.relative.replace("/", "__"))
            self.w.done(item.relative)
            self.taken.append(item.relative)
        return len(ready)


def clock(start: float = 0.0, tick: float = 0.25) -> Iterator[float]:
    now = start
    while True:
        yield now
        now += tick


@pytest.mark.parametrize("files", [300, 3000])
def test_a_quiet_step_looks_at_no_file_whatever_the_backlog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: int
) -> None:
    """Files settling, none due, nothing happening: a step makes no system call at all; once
    their time is up, one look each."""
    w = inbox(tmp_path, limit=None)
    backlog(w.root, files)
    calls = Calls(monkeypatch)
    for now in (0.0, 0.1, 0.2, 0.3):  # the start-up scan, a bounded part of it each step
        assert w.step(now) == []
    quiet, ready = calls.during(lambda: w.step(0.5))
    assert (quiet, ready) == (0, [])
    settled, ready = calls.during(lambda: w.step(1.5))
    assert len(ready) == files
    assert settled == files


@pytest.mark.parametrize("files", [300, 3000])
def test_the_first_files_are_tracked_before_the_tree_is_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: int
) -> None:
    w = inbox(tmp_path)
    backlog(w.root, files)
    calls = Calls(monkeypatch)
    first, ready = calls.during(lambda: w.step(0.0))
    assert ready == []
    assert len(w.pending) == LIMIT
    assert first <= 2 * LIMIT + 2 * files // FOLDER_SIZE  # folders listed: 2 at most
    quiet, ready = calls.during(lambda: w.step(0.5))  # no room: the scan waits
    assert (quiet, ready) == (0, [])
    settled, ready = calls.during(lambda: w.step(1.0))
    assert len(ready) == LIMIT
    assert settled == LIMIT  # one look at each file whose settle time is up


@pytest.mark.parametrize("files", [300, 3000])
def test_a_backlog_costs_the_same_per_file_whatever_its_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: int
) -> None:
    """Draining the backlog: system calls per file handed out stay the same, and the most a
    step costs does not grow with the backlog (both bounded by the tracked files)."""
    w = inbox(tmp_path)
    keys = backlog(w.root, files)
    claimer = Claimer(w, tmp_path / "claimed")
    calls = Calls(monkeypatch)
    per_step = []
    for now in clock():
        cost, _ = calls.during(lambda: claimer.step(now))  # noqa: B023 (called at once)
        per_step.append(cost)
        if not w.waiting():
            break
    assert sorted(claimer.taken) == sorted(keys)
    assert calls.count <= 4 * files
    assert max(per_step) <= 3 * LIMIT + 2 * FOLDER_SIZE


def test_every_file_once_with_files_and_folders_added_during_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files added while the backlog drains, into folders already listed, into the folder
    being read, into new folders (with a hint, or found by scans alone), and hints for files
    that found no room: each is handed out exactly once."""
    w = inbox(tmp_path)
    keys = backlog(w.root, 1000)
    claimer = Claimer(w, tmp_path / "claimed")
    added = []

    def add(key: str, hint: str | None = None) -> None:
        path = w.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"y")
        added.append(key)
        if hint == RESCAN:
            w.hints.put((RESCAN, ""))
        elif hint is not None:
            w.hints.put((hint, str(path)))

    for steps, now in enumerate(clock(), start=1):
        claimer.step(now)
        if steps == 3:
            listed = [folder for folder in w.tree.folders if folder]
            assert listed
            assert w.tree.stack
            assert w.tree.reading is not None  # the pass waits for room
            add(f"{listed[0]}/late.jpg")  # a folder listed to the end already
            add(f"{w.tree.stack[0]}/late.jpg", CHANGED)  # not reached yet; a hint, no room
            add(f"{w.tree.reading[0]}/during.jpg")  # the folder being read
        if steps == 20:
            for i in range(150):
                add(f"new/deeper/n{i:03d}.jpg")  # found by scans alone
            add("hinted/h.jpg", RESCAN)
            add("top.jpg", CHANGED)
        if steps > 20 and not w.waiting():
            break
    assert sorted(claimer.taken) == sorted(keys + added)
    assert max(Counter(claimer.taken).values()) == 1
    assert len(w.pending) == len(w.handed_out) == 0
    # The scans looked at the tree again as it changed, and remember only what is there.
    assert "new/deeper" in w.tree.folders


def test_a_file_left_in_place_after_it_was_handed_out_is_offered_again(tmp_path: Path) -> None:
    """The service could not move it (a read-only folder): it comes back at the next scan,
    though its folder's mtime did not change."""
    w = inbox(tmp_path)
    backlog(w.root, 3)
    assert len(w.step(0.0) + w.step(1.0)) == 3
    for key in ("f000/p00000.jpg", "f000/p00001.jpg", "f000/p00002.jpg"):
        w.done(key)
    assert len(w.step(10.0) + w.step(11.0)) == 3


def test_a_folder_whose_mtime_did_not_change_is_listed_again_after_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mtime may lie (coarse clocks, attributes cached by a share's client): a file that
    appears without changing its folder's mtime is still found, within RELIST_SECONDS."""
    w = inbox(tmp_path)
    (w.root / "sub").mkdir()
    old = (1_000_000_000_000_000_000, 1_000_000_000_000_000_000)  # 2001: an mtime to trust
    os.utime(w.root / "sub", ns=old)
    os.utime(w.root, ns=old)
    w.step(0.0)
    assert w.tree.folders["sub"].trusted
    (w.root / "sub" / "hidden-by-cache.jpg").write_bytes(b"x")
    os.utime(w.root / "sub", ns=old)  # as a client with stale attributes sees it
    found = []
    for now in clock(10.0, 10.0):
        found += [r.relative for r in w.step(now) + w.step(now + 1.0)]
        if found or now > 2 * scan.RELIST_SECONDS:
            break
    assert found == ["sub/hidden-by-cache.jpg"]
    assert now >= scan.RELIST_SECONDS


def test_a_file_opened_while_there_was_no_room_is_held_until_closed(tmp_path: Path) -> None:
    """A writer opens a file while every place is taken: once a scan tracks it, it is held
    while open, as if it had been tracked from the start (a pause longer than settle_ms in a
    slow copy must not get it taken half-written)."""
    w = inbox(tmp_path)
    backlog(w.root, LIMIT)
    claimer = Claimer(w, tmp_path / "claimed")
    claimer.step(0.0)
    assert len(w.pending) == LIMIT
    slow = w.root / "slow.jpg"
    with slow.open("wb") as writer:
        w.hints.put((OPENED, str(slow)))
        writer.write(b"part")
        writer.flush()
        w.hints.put((CHANGED, str(slow)))
        assert claimer.step(0.5) == 0  # no room: not tracked
        assert claimer.step(1.0) == LIMIT  # room again: a scan tracks it
        assert claimer.step(1.25) == 0
        assert "slow.jpg" in w.pending
        for now in (2.5, 5.0, 30.0):  # quiet, but still open
            assert claimer.step(now) == 0
    w.hints.put((CLOSED, str(slow)))
    assert claimer.step(31.0) == 1
    assert claimer.taken[-1] == "slow.jpg"


def inbox_files(root: Path) -> int:
    """Files in the inbox, as the backlog gauges mean them (hidden names and state apart)."""
    return sum(
        not scan.is_ignored(name)
        for parent, folders, names in os.walk(root)
        if not any(scan.is_ignored(part) for part in Path(parent).relative_to(root).parts)
        for name in names
    )


def test_the_files_waiting_are_counted_tracked_or_not(tmp_path: Path) -> None:
    """The backlog gauges: a backlog ten times the files tracked is counted whole; the count
    follows the files taken at once, and files arriving (with an event or without, tracked or
    not) by the next count at the latest; the oldest file's age is that of the backlog, not
    that of the file tracked last."""
    w = inbox(tmp_path)
    backlog(w.root, 1000)
    claimer = Claimer(w, tmp_path / "claimed")
    claimer.step(0.0)
    first_seen = time.time()
    assert len(w.pending) == LIMIT
    assert w.waiting_files() == 1000
    arrived, unknown, counted_at = 0, 0, w.census_began
    for steps, now in enumerate(clock(0.25), start=1):
        if steps % 7 == 0:  # one an event reports, one no event reports
            hinted = w.root / "f003" / f"hinted-{steps}.jpg"
            hinted.write_bytes(b"y")
            w.hints.put((CHANGED, str(hinted)))
            (w.root / "f005" / f"quiet-{steps}.jpg").write_bytes(b"y")
            arrived, unknown = arrived + 2, unknown + 2
        claimer.step(now)
        if w.census_began != counted_at:  # counted afresh in this step
            unknown, counted_at = 0, w.census_began
        waiting = inbox_files(w.root)
        assert waiting - unknown <= w.waiting_files() <= waiting
        if waiting > LIMIT:
            oldest = w.oldest_detected()
            assert oldest is not None
            assert oldest <= first_seen
        if not w.waiting():
            break
    assert len(claimer.taken) == 1000 + arrived
    assert w.waiting_files() == 0


def test_a_folder_replaced_by_one_with_the_same_mtime_is_listed_again(tmp_path: Path) -> None:
    """A folder moved away and another one moved in under its name, with the same mtime (a
    copy that keeps times, two folders swapped): its files are found at the next scan."""
    w = inbox(tmp_path)
    old = (1_000_000_000_000_000_000, 1_000_000_000_000_000_000)  # 2001: an mtime to trust
    for name, photo in (("shoot", "a.jpg"), ("incoming", "b.jpg")):
        (w.root / name).mkdir()
        (w.root / name / photo).write_bytes(b"x")
        os.utime(w.root / name, ns=old)
    os.utime(w.root, ns=old)
    assert [r.relative for r in w.step(0.0) + w.step(1.0)] == ["incoming/b.jpg", "shoot/a.jpg"]
    (w.root / "incoming" / "c.jpg").write_bytes(b"x")
    os.utime(w.root / "incoming", ns=old)
    os.rename(w.root / "shoot", tmp_path / "away")
    os.rename(w.root / "incoming", w.root / "shoot")
    found = [r.relative for r in w.step(10.0) + w.step(11.0)]
    assert sorted(found) == ["shoot/b.jpg", "shoot/c.jpg"]


def test_files_of_an_inbox_folder_away_for_a_while_are_not_forgotten(tmp_path: Path) -> None:
    """The inbox folder goes away in the middle of a backlog (moved aside, a share that
    dropped) and comes back as it was: nothing is looked at meanwhile, so neither the files
    tracked nor the rest of the listing being read are taken for gone; each is handed out
    once, without waiting for the next full listing."""
    config = inbox(tmp_path).config
    w = InboxWatcher(config, scan_interval=10.0, observe=True, limit=LIMIT)
    w.start()
    try:
        keys = [f"p{i:03d}.jpg" for i in range(3 * LIMIT)]
        for key in keys:
            (w.root / key).write_bytes(b"x")
        old = (1_000_000_000_000_000_000, 1_000_000_000_000_000_000)  # an mtime to trust
        os.utime(w.root, ns=old)
        claimer = Claimer(w, tmp_path / "claimed")
        claimer.step(0.0)
        assert len(w.pending) == LIMIT
        os.rename(w.root, tmp_path / "aside")
        for now in (1.0, 2.0, 3.0):
            assert claimer.step(now) == 0
        os.rename(tmp_path / "aside", w.root)
        for now in clock(4.0):
            claimer.step(now)
            if not w.waiting() or now > scan.RELIST_SECONDS / 2:
                break
        assert sorted(claimer.taken) == keys
    finally:
        w.stop()


def test_a_live_daemon_takes_a_backlog_and_what_arrives_meanwhile_once(
    site: Site, photos: dict[str, np.ndarray]
) -> None:
    """The real daemon: files waiting in subfolders at start, then, while they are being
    processed, files added to a folder already listed and to folders created meanwhile."""
    site.write_config()
    images = photo_jpegs(photos, 4)
    waiting = [f"shoot-{f}/p{i}.jpg" for f in range(3) for i in range(4)]
    for i, relative in enumerate(waiting):
        corpus.write(site.inbox, relative, images[i % 4])
    daemon = start(site.config, log=site.root / "log")
    try:
        wait_for(lambda: site.files(site.done), 180, "a first file of the backlog")
        arriving = ["shoot-0/late.jpg", "new/deeper/n0.jpg", "new/deeper/n1.jpg", "top.jpg"]
        for i, relative in enumerate(arriving):
            corpus.write(site.inbox, relative, images[i % 4])
        everything = sorted(waiting + arriving)
        wait_for(lambda: site.files(site.done) == everything, 300, "every file in done/")
    finally:
        assert stop(daemon) == 0
    rows = site.rows()
    assert sorted(str(r["path"]) for r in rows) == everything  # one job each
    assert all(r["outcome"] == "success" for r in rows)
