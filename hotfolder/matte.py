"""``hotfolder matte``: files and folders through the engine once, without watching.

Decoding runs in a thread pool one batch ahead of the engine and encoding one batch behind it, so
the model is rarely idle; at most three batches of pictures are in memory at any time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hotfolder import imaging, names, naming, recipes
from hotfolder.config import LimitsConfig
from hotfolder.handoff import Predictor
from hotfolder.jobs import ImageError, Reason
from hotfolder.publish import write_atomic

log = logging.getLogger(__name__)

# Names that say "photo": such a file that cannot be read is a failure, never skipped.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
IMAGE_SUFFIXES |= {".heic", ".heif", ".avif", ".jfif", ".mpo"}


@dataclass(frozen=True)
class Task:
    """One input file and the output path of each requested output."""

    source: Path
    targets: tuple[tuple[recipes.Output, Path], ...]
    from_folder: bool = False  # found by walking a folder, rather than named by the user


@dataclass
class Summary:
    written: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)

    skipped: list[Path] = field(default_factory=list)

    def fail(self, path: Path, message: str) -> None:
        log.error("%s: %s", names.escape(str(path)), message)
        self.failed.append((path, message))

    def skip(self, path: Path, message: str) -> None:
        log.info("%s: skipped: %s", names.escape(str(path)), message)
        self.skipped.append(path)


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def find_inputs(inputs: Iterable[Path]) -> Iterator[tuple[Path, Path, bool]]:
    """(file, its output subfolder relative to OUTDIR, found in a folder): folders are walked,
    hidden names skipped, and their subfolders mirrored; files given directly land at the top
    of OUTDIR."""
    for given in inputs:
        if not given.is_dir():
            yield given, Path(), False
            continue
        for folder, subfolders, files in os.walk(given):
            subfolders[:] = sorted(d for d in subfolders if not is_hidden(d))
            relative = Path(folder).relative_to(given)
            for name in sorted(files):
                if not is_hidden(name):
                    yield Path(folder) / name, relative, True


def plan(
    inputs: Iterable[Path], outdir: Path, outputs: tuple[recipes.Output, ...], summary: Summary
) -> list[Task]:
    """Tasks with their output paths. Two inputs whose outputs would share a name (``item.jpg``
    and ``item.png``) get numbered names (``item.png``, ``item-2.png``), as in the daemon; an
    output never replaces an input. A file reached twice (named twice, or in a folder also
    given) is planned once, where it was first reached."""
    files = list(_first_of_each(find_inputs(inputs)))
    sources = {str(path.resolve()) for path, _, _ in files}
    registry = naming.MemoryRegistry()
    tasks = []
    for source, relative, from_folder in files:
        owner = str(source.resolve())
        paths = naming.choose(
            outputs,
            (relative / source.name).as_posix(),
            naming.Collision.SUFFIX,
            owner,
            registry,
            key=lambda path: str((outdir / path).resolve()),
            taken=lambda key: key in sources,
        )
        targets = tuple(zip(outputs, (outdir / p for p in paths), strict=True))
        tasks.append(Task(source, targets, from_folder))
    return tasks


def _first_of_each(
    files: Iterable[tuple[Path, Path, bool]],
) -> Iterator[tuple[Path, Path, bool]]:
    seen = set()
    for found in files:
        key = found[0].resolve()
        if key not in seen:
            seen.add(key)
            yield found


def drop_missing(tasks: list[Task], summary: Summary) -> list[Task]:
    """The tasks whose input exists; a file named on the command line that does not is
    reported at once (before the model loads) and counts as a failure."""
    kept = []
    for task in tasks:
        if not task.from_folder and not task.source.exists():
            summary.fail(task.source, "no such file")
        else:
            kept.append(task)
    return kept


def batches(tasks: list[Task], size: int) -> Iterator[list[Task]]:
    for start in range(0, len(tasks), size):
        yield tasks[start : start + size]


def run(
    engine: Predictor,
    tasks: list[Task],
    batch_size: int,
    limits: LimitsConfig,
    summary: Summary,
    progress: Callable[[int], object] = lambda n: None,
) -> Summary:
    """Matte every task; failures are recorded in ``summary`` and never stop the others."""

    def decode(task: Task) -> imaging.Picture:
        data = imaging.read_file(task.source, limits.max_bytes)
        keep_source = recipes.wants_source(tuple(output for output, _ in task.targets))
        return imaging.decode(data, limits.max_pixels, keep_source)

    def publish(task: Task, picture: imaging.Picture, alpha: np.ndarray) -> None:
        rendered = recipes.render_all(tuple(o for o, _ in task.targets), picture, alpha)
        for (_, target), data in zip(task.targets, rendered, strict=True):
            write_atomic(target, data)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        pending: list[tuple[Task, Future[None]]] = []
        chunks = batches(tasks, batch_size)
        ahead = [(t, pool.submit(decode, t)) for t in next(chunks, [])]
        while ahead:
            current, ahead = ahead, [(t, pool.submit(decode, t)) for t in next(chunks, [])]
            decoded = []
            for task, future in current:
                try:
                    decoded.append((task, future.result()))
                except (ImageError, OSError) as exc:
                    if task.from_folder and _not_an_image(task.source, exc):
                        summary.skip(task.source, _describe(exc))
                    else:
                        summary.fail(task.source, _describe(exc))
                    progress(1)
            alphas = engine.predict([picture.rgb for _, picture in decoded])
            _finish(pending, summary, progress)  # the previous batch's writes overlapped predict()
            for (task, picture), alpha in zip(decoded, alphas, strict=True):
                pending.append((task, pool.submit(publish, task, picture, alpha)))
        _finish(pending, summary, progress)
    return summary


def _finish(
    pending: list[tuple[Task, Future[None]]],
    summary: Summary,
    progress: Callable[[int], object],
) -> None:
    """Wait for every write in flight, recording each outcome."""
    for task, future in pending:
        try:
            future.result()
            summary.written += 1
        except (OSError, ValueError, ImageError) as exc:
            message = exc.message if isinstance(exc, ImageError) else str(exc)
            summary.fail(task.source, f"cannot write outputs: {message}")
        progress(1)
    pending.clear()


def _not_an_image(path: Path, exc: Exception) -> bool:
    """A file in a walked folder that is no image, by its content and by its name (a README,
    notes.txt): skipped, not counted as a failure. A file named like an image that is not one
    still is a failure: somebody meant it to be a photo."""
    unsupported = isinstance(exc, ImageError) and exc.reason == Reason.UNSUPPORTED
    return unsupported and path.suffix.lower() not in IMAGE_SUFFIXES


def _describe(exc: Exception) -> str:
    if isinstance(exc, ImageError):
        return exc.message
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a folder"
    return f"cannot read: {getattr(exc, 'strerror', None) or exc}"
