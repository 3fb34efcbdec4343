"""Readiness: the watcher's step() driven with an explicit clock on real files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from hotfolder import recipes
from hotfolder.config import InboxConfig
from hotfolder.watch import CHANGED, CLOSED, OPENED, InboxWatcher, is_ignored


def watcher(
    tmp_path: Path, settle_ms: int = 1000, recursive: bool = True, grace_ms: int = 60_000
) -> InboxWatcher:
    config = InboxConfig(
        name="t", path=tmp_path / "in", outbox=tmp_path / "out", done=tmp_path / "done",
        errors=tmp_path / "err", settle_ms=settle_ms, recursive=recursive,
        incomplete_grace_ms=grace_ms, outputs=(recipes.Output(recipes.Kind.CUTOUT),),
    )  # fmt: skip
    config.path.mkdir(exist_ok=True)
    w = InboxWatcher(config, scan_interval=10.0, observe=False)
    w.start()
    return w


def ready_names(w: InboxWatcher, now: float) -> list[str]:
    return sorted(r.relative for r in w.step(now))


@pytest.mark.parametrize(
    "name",
    ["x.part", "x.jpg.partial", ".hidden.jpg", "x.tmp", "x.crdownload", "~$x.jpg", "Thumbs.db",
     ".DS_Store", "x.jpg.download", "x.swp", ".~lock.x#", ".syncthing.x.jpg.tmp", "x.JPG.PART"],
)  # fmt: skip
def test_temporary_and_hidden_names_are_ignored(name: str) -> None:
    assert is_ignored(name)


@pytest.mark.parametrize("name", ["photo.jpg", "my photo (2).png", "été.webp", "x.jpeg"])
def test_ordinary_names_are_taken(name: str) -> None:
    assert not is_ignored(name)


def test_file_is_ready_after_settling(tmp_path: Path) -> None:
    w = watcher(tmp_path)
    (w.root / "a.jpg").write_bytes(b"x" * 10)
    assert ready_names(w, 0.0) == []  # found by the start-up scan
    assert ready_names(w, 0.9) == []
    assert ready_names(w, 1.0) == ["a.jpg"]
    assert ready_names(w, 2.0) == []  # handed out once


def test_growing_or_touched_file_restarts_the_settle_window(tmp_path: Path) -> None:
    w = watcher(tmp_path)
    path = w.root / "slow.jpg"
    path.write_bytes(b"x")
    ready_names(w, 0.0)
    with path.open("ab") as f:
        f.write(b"more")
    assert ready_names(w, 0.8) == []  # size changed: the window starts again at 0.8
    assert ready_names(w, 1.5) == []
    # Same size, new mtime (Explorer over SMB sets the size first, then fills the file).
    os.utime(path, ns=(1, 1))
    assert ready_names(w, 1.7) == []
    assert ready_names(w, 2.6) == []
    assert ready_names(w, 2.7) == ["slow.jpg"]


def test_vanished_file_is_forgotten(tmp_path: Path) -> None:
    w = watcher(tmp_path)
    (w.root / "gone.jpg").write_bytes(b"x")
    ready_names(w, 0.0)
    (w.root / "gone.jpg").unlink()
    assert ready_names(w, 5.0) == []
    assert w.pending == {}


def test_scan_is_periodic_and_recursive(tmp_path: Path) -> None:
    w = watcher(tmp_path, settle_ms=0)
    found_by_scan: list[bool] = []
    w.on_detected = found_by_scan.append
    assert ready_names(w, 0.0) == []
    (w.root / "sub" / "deeper").mkdir(parents=True)
    (w.root / "sub" / "deeper" / "b.jpg").write_bytes(b"x")
    (w.root / ".hotfolder").mkdir()
    (w.root / ".hotfolder" / "c.jpg").write_bytes(b"x")
    assert ready_names(w, 5.0) == []  # not scanned again yet: no event either
    assert ready_names(w, 10.0) == ["sub/deeper/b.jpg"]
    assert found_by_scan == [True]


def test_non_recursive_inbox_ignores_subfolders(tmp_path: Path) -> None:
    w = watcher(tmp_path, settle_ms=0, recursive=False)
    (w.root / "sub").mkdir()
    (w.root / "sub" / "b.jpg").write_bytes(b"x")
    (w.root / "a.jpg").write_bytes(b"x")
    assert ready_names(w, 0.0) == ["a.jpg"]


def test_a_new_file_of_a_handed_out_name_counts_once_done(tmp_path: Path) -> None:
    w = watcher(tmp_path, settle_ms=0)
    (w.root / "a.jpg").write_bytes(b"x")
    assert ready_names(w, 0.0) == ["a.jpg"]
    assert ready_names(w, 10.0) == []  # still handed out: the scan does not offer it twice
    w.done("a.jpg")
    assert ready_names(w, 20.0) == ["a.jpg"]


def test_deleted_and_recreated_inbox_restarts_the_observer(tmp_path: Path) -> None:
    config = watcher(tmp_path).config
    restarts: list[str] = []
    w = InboxWatcher(
        config, scan_interval=10.0, observe=True, on_restart=lambda: restarts.append("restart")
    )
    w.start()
    try:
        assert w.healthy()
        w.root.rename(tmp_path / "old")
        w.root.mkdir()
        assert not w.healthy()
        w.step(0.0)
        assert w.healthy()
        assert restarts == ["restart"]
    finally:
        w.stop()


def test_a_file_open_in_a_process_waits_for_its_close(tmp_path: Path) -> None:
    """An open seen and no close yet: not ready after settling; ready once closed and settled."""
    w = watcher(tmp_path)
    path = w.root / "held.jpg"
    path.write_bytes(b"x")
    w.hints.put((CHANGED, str(path)))
    w.hints.put((OPENED, str(path)))
    assert ready_names(w, 0.0) == []
    assert ready_names(w, 5.0) == []  # quiet for 5 s, but still open
    w.hints.put((CLOSED, str(path)))
    assert ready_names(w, 5.1) == ["held.jpg"]  # unchanged since 0.0, now closed


def test_opens_and_closes_are_counted(tmp_path: Path) -> None:
    w = watcher(tmp_path)
    path = w.root / "two.jpg"
    path.write_bytes(b"x")
    for kind in (OPENED, OPENED, CLOSED):
        w.hints.put((kind, str(path)))
    assert ready_names(w, 0.0) == []
    assert ready_names(w, 2.0) == []  # one open left
    w.hints.put((CLOSED, str(path)))
    w.hints.put((CLOSED, str(path)))  # a close more than opens seen: not below zero
    assert ready_names(w, 2.1) == ["two.jpg"]
    w.done("two.jpg")
    w.hints.put((OPENED, str(path)))  # a new open: held again
    assert ready_names(w, 2.2) == []
    assert ready_names(w, 3.3) == []


def test_a_file_never_closed_is_taken_after_the_grace_time(tmp_path: Path) -> None:
    w = watcher(tmp_path, grace_ms=30_000)
    path = w.root / "stuck.jpg"
    path.write_bytes(b"x")
    w.hints.put((OPENED, str(path)))
    assert ready_names(w, 0.0) == []
    assert ready_names(w, 20.0) == []
    with path.open("ab") as f:  # written to: the grace time starts again
        f.write(b"y")
    assert ready_names(w, 25.0) == []
    assert ready_names(w, 54.9) == []
    assert ready_names(w, 55.0) == ["stuck.jpg"]


def test_a_file_put_back_as_cut_short_waits_the_grace_time(tmp_path: Path) -> None:
    """The decode stage found it cut short: held, unchanged, for the grace time, then handed
    out once more and refused; any change makes it an ordinary file again."""
    w = watcher(tmp_path, grace_ms=30_000)
    path = w.root / "cut.jpg"
    path.write_bytes(b"\xff\xd8")
    assert ready_names(w, 0.0) == []
    assert ready_names(w, 1.0) == ["cut.jpg"]
    info = path.stat()
    assert w.still_arriving("cut.jpg", info.st_size, info.st_mtime_ns, 1.5)  # put back
    w.done("cut.jpg")
    assert w.pending == {}
    assert w.waiting()  # put back: still to be handled (--once must not stop yet)
    w.hints.put((CHANGED, str(path)))  # moved back into the inbox
    assert ready_names(w, 2.0) == []
    assert ready_names(w, 12.0) == []  # settled, but held
    assert ready_names(w, 31.4) == []
    assert ready_names(w, 31.5) == ["cut.jpg"]
    assert w.still_arriving("cut.jpg", info.st_size, info.st_mtime_ns, 31.6) is False  # refuse
    assert w.unfinished == {}

    # Put back again, then written to: no longer held.
    assert w.still_arriving("cut.jpg", info.st_size, info.st_mtime_ns, 40.0)
    w.done("cut.jpg")
    w.hints.put((CHANGED, str(path)))
    assert ready_names(w, 40.0) == []
    with path.open("ab") as f:
        f.write(b"\xff\xd9")
    assert ready_names(w, 41.0) == []
    assert ready_names(w, 42.0) == ["cut.jpg"]
    assert w.unfinished == {}


def test_no_grace_time_refuses_at_once_and_ignores_opens(tmp_path: Path) -> None:
    w = watcher(tmp_path, grace_ms=0)
    path = w.root / "a.jpg"
    path.write_bytes(b"x")
    w.hints.put((OPENED, str(path)))
    assert ready_names(w, 0.0) == []
    assert ready_names(w, 1.0) == ["a.jpg"]
    assert w.still_arriving("a.jpg", 1, path.stat().st_mtime_ns, 1.0) is False


def test_watchdog_reports_opens_and_closes_of_local_writers(tmp_path: Path) -> None:
    """The real inotify observer: a file held open is not taken, however long it is quiet."""
    config = watcher(tmp_path, settle_ms=200).config
    w = InboxWatcher(config, scan_interval=3600.0, observe=True)
    w.start()
    try:
        with (w.root / "slow.jpg").open("wb") as f:
            f.write(b"part")
            f.flush()
            deadline = time.monotonic() + 30
            while not any(p.open for p in w.pending.values()):
                assert w.step(time.monotonic()) == []
                assert time.monotonic() < deadline, "no open event seen"
                time.sleep(0.01)
            assert w.step(time.monotonic() + 10) == []  # quiet, but open
        ready: list[str] = []
        while not ready:
            ready = [r.relative for r in w.step(time.monotonic())]
            assert time.monotonic() < deadline, "the close was not seen"
            time.sleep(0.01)
        assert ready == ["slow.jpg"]
    finally:
        w.stop()


def test_a_watcher_never_creates_its_inbox_folder(tmp_path: Path) -> None:
    """A share that dropped leaves a bare mountpoint: the watcher waits for the folder to come
    back instead of making one there, and watches it again once it is back."""
    config = InboxConfig(
        name="t", path=tmp_path / "share" / "in", outbox=tmp_path / "out", done=None,
        errors=tmp_path / "err", outputs=(recipes.Output(recipes.Kind.CUTOUT),),
    )  # fmt: skip
    config.path.mkdir(parents=True)
    w = InboxWatcher(config, scan_interval=10.0, observe=True)
    w.start()
    try:
        assert w.healthy()
        (tmp_path / "share" / "in").rmdir()
        (tmp_path / "share").rmdir()
        for step in range(3):
            w.step(float(step))
        assert not (tmp_path / "share").exists()
        assert not w.healthy()
        config.path.mkdir(parents=True)  # the share is back
        w.step(10.0)
        assert w.healthy()
    finally:
        w.stop()
