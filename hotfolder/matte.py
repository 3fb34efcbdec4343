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

from hotfolder import imaging, recipes
from hotfolder.config import LimitsConfig
from hotfolder.engine import MattingEngine
from hotfolder.jobs import ImageError
from hotfolder.publish import write_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """One input file and the output path of each requested output."""

    source: Path
    targets: tuple[tuple[recipes.Output, Path], ...]


@dataclass
class Summary:
    written: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def fail(self, path: Path, message: str) -> None:
        log.error("%s: %s", path, message)
        self.failed.append((path, message))


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def find_inputs(inputs: Iterable[Path]) -> Iterator[tuple[Path, Path]]:
    """(file, its output subfolder relative to OUTDIR): folders are walked, hidden names skipped,
    and their subfolders mirrored; files given directly land at the top of OUTDIR."""
    for given in inputs:
        if not given.is_dir():
            yield given, Path()
            continue
        for folder, subfolders, files in os.walk(given):
            subfolders[:] = sorted(d for d in subfolders if not is_hidden(d))
            relative = Path(folder).relative_to(given)
            for name in sorted(files):
                if not is_hidden(name):
                    yield Path(folder) / name, relative


def plan(
    inputs: Iterable[Path], outdir: Path, outputs: tuple[recipes.Output, ...], summary: Summary
) -> list[Task]:
    """Tasks with their output paths; an input whose outputs would overwrite an input or another
    task's outputs is reported instead of clobbering anything."""
    files = list(find_inputs(inputs))
    sources = {path.resolve() for path, _ in files}
    taken: dict[Path, Path] = {}
    tasks = []
    for source, relative in files:
        targets = tuple(
            (output, outdir / relative / output.filename(source.stem, source.suffix))
            for output in outputs
        )
        clash = next(
            (t for _, t in targets if t.resolve() in sources or t.resolve() in taken), None
        )
        if clash is not None:
            other = taken.get(clash.resolve(), clash)
            summary.fail(source, f"its output {clash} would overwrite {other}; skipped")
            continue
        taken.update({t.resolve(): source for _, t in targets})
        tasks.append(Task(source, targets))
    return tasks


def batches(tasks: list[Task], size: int) -> Iterator[list[Task]]:
    for start in range(0, len(tasks), size):
        yield tasks[start : start + size]


def run(
    engine: MattingEngine,
    tasks: list[Task],
    batch_size: int,
    limits: LimitsConfig,
    summary: Summary,
    progress: Callable[[int], object] = lambda n: None,
) -> Summary:
    """Matte every task; failures are recorded in ``summary`` and never stop the others."""

    def decode(task: Task) -> imaging.Picture:
        data = imaging.read_file(task.source, limits.max_bytes)
        return imaging.decode(data, limits.max_pixels)

    def publish(task: Task, picture: imaging.Picture, alpha: np.ndarray) -> None:
        for output, target in task.targets:
            write_atomic(target, recipes.render(output, picture, alpha))

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
        except (OSError, ValueError) as exc:
            summary.fail(task.source, f"cannot write outputs: {exc}")
        progress(1)
    pending.clear()


def _describe(exc: Exception) -> str:
    if isinstance(exc, ImageError):
        return exc.message
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a folder"
    return f"cannot read: {getattr(exc, 'strerror', None) or exc}"
