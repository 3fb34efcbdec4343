"""Root identity and write probes (hotfolder/roots.py) on real folders."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from hotfolder.roots import PROBE_PREFIX, Pause, Root, Roots, probe, usable


def test_a_writable_folder_passes_the_probe_and_keeps_no_probe_file(tmp_path: Path) -> None:
    assert probe(tmp_path) is None
    assert not any(p.name.startswith(PROBE_PREFIX) for p in tmp_path.iterdir())


def test_a_folder_without_the_space_a_job_needs_fails_the_probe(tmp_path: Path) -> None:
    stats = os.statvfs(tmp_path)
    free = stats.f_bavail * stats.f_frsize
    error = probe(tmp_path, need=free + 2**30)
    assert error is not None
    assert error.errno == errno.ENOSPC


def test_a_missing_folder_fails_the_probe(tmp_path: Path) -> None:
    error = probe(tmp_path / "gone")
    assert error is not None
    assert error.errno == errno.ENOENT


def test_a_deleted_folder_is_away_until_it_is_back_on_its_filesystem(tmp_path: Path) -> None:
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    outbox.mkdir()
    roots = Roots([inbox, outbox])
    assert roots.away() == []
    assert not Root.of(inbox).mounted  # a plain folder, on its parent's filesystem
    shutil.rmtree(inbox)
    assert [root.path for root in roots.away()] == [inbox]
    inbox.mkdir()  # the same filesystem: a recreated folder is the same root
    assert roots.away() == []


def test_a_folder_on_another_filesystem_than_at_start_is_away(tmp_path: Path) -> None:
    """A plain folder replaced by a link to another filesystem (here /proc, always another
    one) is not where the daemon may write."""
    folder = tmp_path / "outbox"
    folder.mkdir()
    roots = Roots([folder])
    folder.rmdir()
    folder.symlink_to("/proc")
    assert [root.path for root in roots.away()] == [folder]


def test_a_pause_lasts_until_each_held_folder_passes_a_probe(tmp_path: Path) -> None:
    full, fine = tmp_path / "outbox", tmp_path / "done"
    full.mkdir()
    fine.mkdir()
    pause = Pause(interval=1.0)
    huge = 2**62  # no filesystem has this much free: stands for a full disk
    assert pause.hold(Root.of(full), "disk_full", now=0.0, need=huge)
    assert pause.hold(Root.of(fine), "read_only", now=0.0)
    assert not pause.hold(Root.of(fine), "read_only", now=0.5)  # already held
    assert pause.active
    assert pause.reasons() == {"disk_full", "read_only"}
    assert pause.probe_due(now=0.5) == []  # not probed before its interval
    assert [root.path for root in pause.probe_due(now=1.0)] == [fine]
    assert pause.active  # the full folder still fails its probe
    assert pause.reasons() == {"disk_full"}
    assert pause.probe_due(now=1.5) == []
    assert pause.probe_due(now=2.0) == []  # probed again: still full
    assert pause.active


def test_a_held_folder_is_released_once_it_is_back(tmp_path: Path) -> None:
    folder = tmp_path / "errors"
    folder.mkdir()
    root = Root.of(folder)
    folder.rmdir()
    assert not usable(root)
    pause = Pause(interval=1.0)
    pause.hold(root, "io_error", now=0.0)
    assert pause.probe_due(now=1.0) == []
    folder.mkdir()
    assert pause.probe_due(now=2.0) == [root]
    assert not pause.active


def test_a_reload_forgets_the_pause_of_a_folder_no_longer_used(tmp_path: Path) -> None:
    old, new = tmp_path / "old-outbox", tmp_path / "new-outbox"
    old.mkdir()
    new.mkdir()
    pause = Pause(interval=1.0)
    pause.hold(Root.of(old), "disk_full", now=0.0, need=2**62)
    pause.keep_only([Root.of(old)])
    assert pause.active
    pause.keep_only([Root.of(new)])
    assert not pause.active


def test_the_check_at_start_writes_nothing(tmp_path: Path) -> None:
    from hotfolder.roots import looks_writable

    assert looks_writable(tmp_path) is None
    full = looks_writable(tmp_path, need=2**62)  # no filesystem has this much free
    assert full is not None
    assert full.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
