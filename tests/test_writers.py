"""Fault injection on a live daemon: writers that pause longer than ``settle_ms``.

Real writer threads write real files into the inbox of a running daemon, the way slow and
stalling copies do. Each file must be published once, from its complete bytes (the journal's
sha256 is that of the bytes that were decoded), with nothing in errors/; and a file that really
is cut short, and never changes, must still be refused once the grace time is over. Every wait
is a poll with a deadline; the writers' sleeps are their pace, not waits for the daemon.
Run these alone with ``pytest -m faults``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hotfolder import imaging

from . import corpus
from .daemon import Site, start, stop, wait_for, wait_serving

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

SETTLE_MS = 500
STALL = 3.0  # a writer's pause, six times settle_ms
GAP = 1.2  # between chunks, over twice settle_ms


def open_then_stall(path: Path, data: bytes) -> None:
    """Creates the file, writes nothing for a while, then writes it whole."""
    with path.open("wb") as f:
        time.sleep(STALL)
        f.write(data)


def in_chunks(path: Path, data: bytes) -> None:
    """Five chunks with pauses between them."""
    with path.open("wb") as f:
        for i in range(5):
            if i:
                time.sleep(GAP)
            f.write(data[i * len(data) // 5 : (i + 1) * len(data) // 5])
            f.flush()


def preallocated(path: Path, data: bytes) -> None:
    """Sets the final size first, then fills the file (Windows Explorer over SMB): 90 %, a
    stall, the rest. Meanwhile the file has its final size and ends in zeros."""
    cut = len(data) * 9 // 10
    with path.open("wb") as f:
        f.truncate(len(data))
        f.write(data[:cut])
        f.flush()
        time.sleep(STALL)
        f.write(data[cut:])


def end_first(path: Path, data: bytes) -> None:
    """Sets the final size, writes the last chunk first, then the others in order, with
    pauses between (a segmented downloader, SMB writes that complete out of order): for a
    while the file starts with zeros."""
    chunks = [(i * len(data) // 4, (i + 1) * len(data) // 4) for i in range(4)]
    with path.open("wb") as f:
        f.truncate(len(data))
        for first, last in [chunks[-1], *chunks[:-1]]:
            f.seek(first)
            f.write(data[first:last])
            f.flush()
            time.sleep(GAP)


WRITERS: dict[str, Callable[[Path, bytes], None]] = {
    "open-then-stall": open_then_stall,
    "chunks": in_chunks,
    "preallocated": preallocated,
    "end-first": end_first,
}


class Writer(threading.Thread):
    def __init__(self, write: Callable[[Path, bytes], None], path: Path, data: bytes) -> None:
        super().__init__(daemon=True)
        self.write, self.path, self.data = write, path, data
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.write(self.path, self.data)
        except BaseException as exc:
            self.error = exc


def zero_tail(data: bytes, kept: float) -> bytes:
    cut = int(len(data) * kept)
    return data[:cut] + bytes(len(data) - cut)


def sidecars(site: Site) -> dict[str, dict[str, object]]:
    reports = [json.loads(p.read_text()) for p in site.errors.rglob("*.error.json")]
    return {str(r["file"]): r for r in reports}


@pytest.fixture(scope="module")
def photo(photos: dict[str, np.ndarray]) -> bytes:
    """A JPEG that decodes without error when its last 10 % are zeros (the decoder alone
    would publish the partial copy)."""
    data = corpus.jpeg(photos["coffee"], quality=95)
    imaging.decode(zero_tail(data, 0.9))
    return data


# A writer that fills a file out of order can make it look whole (its start and its end
# written, zeros between) during a pause; with inotify the open file is held, but polling on a
# share cannot see that it is open. So that writer is tested with inotify only.
CASES = [(w, p) for w in WRITERS for p in (False, True) if not (w == "end-first" and p)]


@pytest.mark.parametrize(
    ("writer", "polling"), CASES, ids=[f"{w}-{'polling' if p else 'inotify'}" for w, p in CASES]
)
def test_a_stalling_writer_is_published_once_from_the_whole_file(
    site: Site, photo: bytes, writer: str, polling: bool
) -> None:
    """With inotify the open file is held until its writer closes it; with polling (a share)
    the daemon may take it during a stall, sees it is cut short, and puts it back."""
    site.write_config(settle_ms=SETTLE_MS, inbox={"polling": polling})
    log = site.root / "log"
    daemon = start(site.config, log=log)
    try:
        wait_serving(log)
        thread = Writer(WRITERS[writer], site.inbox / "photo.jpg", photo)
        thread.start()
        thread.join(60)
        assert not thread.is_alive()
        assert thread.error is None, thread.error
        wait_for(lambda: site.files(site.done) or site.files(site.errors), 120, "the photo filed")
    finally:
        assert stop(daemon) == 0
    assert site.files(site.errors) == []
    assert site.files(site.done) == ["photo.jpg"]
    assert (site.done / "photo.jpg").read_bytes() == photo
    rows = site.rows()
    assert [(r["path"], r["outcome"]) for r in rows] == [("photo.jpg", "success")]
    assert rows[0]["sha256"] == hashlib.sha256(photo).hexdigest()  # what was decoded
    assert site.files(site.outbox) == ["photo.mask.png", "photo.png"]
    with Image.open(site.outbox / "photo.png") as cutout:
        assert cutout.size == (600, 400)
    assert log.read_text().count("photo.jpg: success") == 1
    assert site.visible_inbox_files() == []


def test_a_file_cut_short_for_good_is_refused_after_the_grace_time(
    site: Site, photo: bytes, photos: dict[str, np.ndarray]
) -> None:
    site.write_config(settle_ms=300, inbox={"incomplete_grace_ms": 2000})
    bad = {
        "truncated.jpg": (photo[: len(photo) * 2 // 3], "corrupt"),
        "zero-filled.jpg": (zero_tail(photo, 0.9), "corrupt"),  # decodes without error
        "empty.jpg": (b"", "empty"),
        "zeros.jpg": (bytes(len(photo)), "empty"),  # sized, never written
    }
    log = site.root / "log"
    daemon = start(site.config, log=log)
    try:
        wait_serving(log)
        corpus.write(site.inbox, "good.jpg", corpus.jpeg(photos["astronaut"]))
        for name, (data, _) in bad.items():
            corpus.write(site.inbox, name, data)
        wait_for(
            lambda: len(sidecars(site)) == len(bad) and site.files(site.done) == ["good.jpg"],
            120,
            "the bad files in errors/ and the good one in done/",
        )
    finally:
        assert stop(daemon) == 0
    reports = sidecars(site)
    assert {name: report["reason"] for name, report in reports.items()} == {
        name: reason for name, (_, reason) in bad.items()
    }
    assert "zeros: a copy that stopped part-way?" in str(reports["zero-filled.jpg"]["message"])
    for name, (data, _) in bad.items():
        assert (site.errors / name).read_bytes() == data
    assert site.files(site.outbox) == ["good.mask.png", "good.png"]
    assert site.visible_inbox_files() == []
    # Each was first put back to wait for a writer, and refused only after that.
    text = log.read_text()
    for name in bad:
        put_back = text.find(f"{name}: put back to wait for its writer")
        assert 0 <= put_back < text.find(f"{name}: failed:"), name
