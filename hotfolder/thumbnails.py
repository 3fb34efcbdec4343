"""Small pictures of each published job for the status page, made from the arrays the publish
stage already holds (no second decode), kept under the state folder beside the journal.

Each job gets JPEGs named only by its job id (``<id>.<view>.jpg``): the photo and the cutout on
a checkerboard (so transparency shows) at :data:`SMALL` px on the long side for lists, and the
photo, the cutout and the mask at :data:`LARGE` px for a job's own page. The folder is kept
under a size cap (``metrics.thumbnails_mb``): when a new job's pictures push it over, the
oldest jobs' pictures go first, and at start a cap lowered since the last run (0: none) holds
at once. They are a cache for people looking, not a record: written
without fsync, and a job whose pictures are missing (deleted, never made, another host) is
still shown without them.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np

from hotfolder import config, imaging, recipes

log = logging.getLogger(__name__)

SMALL = 256  # px, long side: lists
LARGE = 640  # px, long side: a job's own page
QUALITY = 80  # JPEG
DEFAULT_MAX_BYTES = 512 * 2**20
CHECKER_PX = 8  # side of one checkerboard square in a thumbnail
CHECKER_SHADES = (204, 255)
# Which picture at which size, by the name a request may ask for (nothing else is served).
VIEWS = ("before", "after", "before-large", "after-large", "mask-large")
JOB_ID = re.compile(r"[0-9a-f]{32}")


class Thumbnails:
    """The thumbnails folder of one daemon. Thread-safe: publish threads save, the status page's
    threads read."""

    def __init__(self, folder: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, int] = OrderedDict()  # job id → bytes, oldest first
        self._total = 0
        self._warned = False
        self._load()
        # A cap lowered since the last run (0 included) holds from the start, not the next job.
        for old in self._evict(keep=0):
            self._delete(old)

    def _load(self) -> None:
        """What earlier runs left, oldest first: read once at start, never per request."""
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return
        jobs: dict[str, tuple[float, int]] = {}
        for entry in entries:
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                _unlink(Path(entry.path))  # a write cut short by a crash
                continue
            job_id = entry.name.split(".", 1)[0]
            if not JOB_ID.fullmatch(job_id) or not entry.is_file(follow_symlinks=False):
                continue
            stat = entry.stat(follow_symlinks=False)
            mtime, size = jobs.get(job_id, (0.0, 0))
            jobs[job_id] = (max(mtime, stat.st_mtime), size + stat.st_size)
        for job_id, (_, size) in sorted(jobs.items(), key=lambda item: item[1][0]):
            self._jobs[job_id] = size
            self._total += size

    def path(self, job_id: str, view: str) -> Path | None:
        """The file of one picture of a job; None when ``job_id`` is not a job id or ``view``
        not one of :data:`VIEWS` (so no request text ever becomes a path)."""
        if not JOB_ID.fullmatch(job_id) or view not in VIEWS:
            return None
        return self.folder / f"{job_id}.{view}.jpg"

    def save(self, job_id: str, picture: imaging.Picture, alpha: np.ndarray) -> None:
        """Make and store a job's pictures; ``alpha`` is the predicted matte, (H, W) uint8.
        Never raises: the job matters, its pictures do not (a full disk, or a picture OpenCV
        refuses, must not stop the publish thread that calls this)."""
        try:
            pictures = render(picture, alpha)
            self.folder.mkdir(parents=True, exist_ok=True)
            size = sum(self._write(job_id, view, data) for view, data in pictures.items())
        except Exception as exc:
            self._forget(job_id)  # all of a job's pictures or none: nothing outside the cap
            if not self._warned:  # once: a full disk would say it for every job
                log.warning("thumbnails not saved in %s: %r", self.folder, exc)
                self._warned = True
            return
        with self._lock:
            self._total += size - self._jobs.pop(job_id, 0)
            self._jobs[job_id] = size
            evicted = self._evict()
        for old in evicted:
            self._delete(old)

    def _write(self, job_id: str, view: str, data: bytes) -> int:
        path = self.path(job_id, view)
        assert path is not None
        temp = path.with_name(f".{path.name}.tmp")
        try:
            temp.write_bytes(data)
            os.replace(temp, path)  # a reader sees the whole picture or none
        except OSError:
            _unlink(temp)
            raise
        return len(data)

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._total -= self._jobs.pop(job_id, 0)
        self._delete(job_id)

    def _evict(self, keep: int = 1) -> list[str]:
        """The oldest jobs to drop so the folder fits the cap, all but the newest ``keep``
        (the job just saved stays, even alone over the cap)."""
        evicted = []
        while self._total > self.max_bytes and len(self._jobs) > keep:
            job_id, size = self._jobs.popitem(last=False)
            self._total -= size
            evicted.append(job_id)
        return evicted

    def _delete(self, job_id: str) -> None:
        for view in VIEWS:
            path = self.path(job_id, view)
            if path is not None:
                _unlink(path)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._total


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.debug("cannot delete thumbnail %s: %s", path, exc)


def render(picture: imaging.Picture, alpha: np.ndarray) -> dict[str, bytes]:
    """JPEG bytes of every view in :data:`VIEWS`, from a picture's ``rgb`` (H, W, 3) uint8 and
    its predicted ``alpha`` (H, W) uint8. The full-size arrays are shrunk once, to
    :data:`LARGE`; the small views are made from the large ones."""
    alpha = recipes.combined_alpha(alpha, picture)
    rgb_large, alpha_large = shrink(picture.rgb, LARGE), shrink(alpha, LARGE)
    rgb_small, alpha_small = shrink(rgb_large, SMALL), shrink(alpha_large, SMALL)
    return {
        "before": jpeg(rgb_small),
        "after": jpeg(on_checkerboard(rgb_small, alpha_small)),
        "before-large": jpeg(rgb_large),
        "after-large": jpeg(on_checkerboard(rgb_large, alpha_large)),
        "mask-large": jpeg(alpha_large),
    }


def shrink(pixels: np.ndarray, long_side: int) -> np.ndarray:
    """``pixels`` scaled down so the long side is at most ``long_side``, cheaply: a large photo
    is first sampled on a grid still twice the target (a view, no copy), then averaged by a
    whole factor, then interpolated to the exact size. OpenCV's area filter at an arbitrary
    factor costs 5 times as much on 1 MP, 3 times on 12 MP; thumbnails do not need it."""
    height, width = pixels.shape[:2]
    if max(height, width) <= long_side:
        return pixels
    step = max(height, width) // (2 * long_side)
    if step >= 2:
        pixels = pixels[::step, ::step]
    factor = max(pixels.shape[:2]) // long_side
    if factor >= 2:
        height, width = pixels.shape[:2]
        size = (max(1, width // factor), max(1, height // factor))  # a panorama 1 px high
        pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    height, width = pixels.shape[:2]
    scale = long_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    shrunk: np.ndarray = cv2.resize(pixels, size, interpolation=cv2.INTER_LINEAR)
    return shrunk


@functools.cache
def checkerboard(height: int, width: int) -> np.ndarray:
    """A grey-and-white board, (height, width, 3) uint8; at most :data:`LARGE` px a side, so
    the few sizes thumbnails have are made once."""
    rows = (np.arange(height) // CHECKER_PX)[:, None]
    cols = (np.arange(width) // CHECKER_PX)[None, :]
    shade = np.where((rows + cols) % 2 == 0, *CHECKER_SHADES).astype(np.uint8)
    board: np.ndarray = cv2.merge((shade, shade, shade))
    board.flags.writeable = False
    return board


def on_checkerboard(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The cutout over a grey-and-white checkerboard, (H, W, 3) uint8, so transparency shows."""
    board = checkerboard(LARGE, LARGE)[: alpha.shape[0], : alpha.shape[1]]
    weight = alpha.astype(np.float32) * np.float32(1 / 255)
    blended: np.ndarray = cv2.blendLinear(rgb, board, weight, 1 - weight)
    return blended


def jpeg(pixels: np.ndarray) -> bytes:
    """JPEG bytes of (H, W, 3) RGB or (H, W) gray uint8 pixels."""
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, QUALITY])
    if not ok:
        raise OSError("cannot encode a thumbnail")
    return bytes(data)


def thumbnail_folder(cfg: config.Config) -> Path:
    """The daemon's state folder for thumbnails: beside its journal."""
    return cfg.journal.parent / "thumbnails"
