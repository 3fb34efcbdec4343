"""Readiness: the watcher's step() driven with an explicit clock on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hotfolder import recipes
from hotfolder.config import InboxConfig
from hotfolder.watch import InboxWatcher, is_ignored


def watcher(tmp_path: Path, settle_ms: int = 1000, recursive: bool = True) -> InboxWatcher:
    config = InboxConfig(
        name="t", path=tmp_path / "in", outbox=tmp_path / "out", done=tmp_path / "done",
        errors=tmp_path / "err", settle_ms=settle_ms, recursive=recursive,
        outputs=(recipes.Output(recipes.Kind.CUTOUT),),
    )  # fmt: skip
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
