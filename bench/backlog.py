"""Backlog benchmark: does a daemon slow down when 100 000 files wait in its inbox?

    python bench/backlog.py --sizes 300 1000 10000 100000 --out backlog.json
    python bench/backlog.py --micro 1000 10000 100000 1000000

Live daemon (the shipped config.yaml, its paths replaced, metrics off): for each backlog size, that
many tiny JPEGs (96×64, 16 distinct ones and hard links to them) in subfolders of 1 000 are in the
inbox before the daemon starts. Measured: seconds from the start of the process to the first
output; images per second over the ``--window`` seconds after the first output (from the
journal); the intake thread's CPU time over that window as a share of one core; the whole
process's CPU share; peak RSS.

``--micro``: one watcher step, in this process, with N files tracked (synthetic entries, none of
them due) plus 10 real files whose settle time is up, and a quiet step (nothing due); and the
memory each tracked file costs (tracemalloc). This shows how a step scales past what a disk here
can hold. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FOLDER_SIZE = 1000
TICKS = os.sysconf("SC_CLK_TCK")


# ----- the daemon, with its threads named for /proc --------------------------------------------


def run_named(argv: list[str]) -> int:
    """``hotfolder`` itself, with each Python thread's name given to its OS thread (15 bytes),
    so that /proc shows which thread is the intake."""
    libc = ctypes.CDLL(None)
    original = threading.Thread.run

    def named(self: threading.Thread) -> None:
        libc.prctl(15, self.name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
        original(self)

    threading.Thread.run = named  # type: ignore[method-assign]
    from hotfolder.cli import main

    return main(argv)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of ``pid``, summed by thread name."""
    seconds: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a thread that ended
        seconds[name] = seconds.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICKS
    return seconds


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ----- a backlog -------------------------------------------------------------------------------


def make_backlog(inbox: Path, count: int) -> None:
    """``count`` JPEGs of 96×64 in subfolders of FOLDER_SIZE: 16 distinct, the rest links."""
    rng = np.random.default_rng(0)
    distinct = inbox.parent / "distinct"
    distinct.mkdir(parents=True, exist_ok=True)
    sources = []
    for i in range(16):
        y, x = np.mgrid[0:64, 0:96]
        picture = np.zeros((64, 96, 3), np.uint8)
        picture[..., 0] = (x * (i + 3)) % 256
        picture[..., 1] = (y * (i + 5)) % 256
        inside = (x - 48) ** 2 + (y - 32) ** 2 < (10 + i) ** 2
        picture[inside] = rng.integers(0, 256, 3)
        path = distinct / f"{i}.jpg"
        Image.fromarray(picture).save(path, quality=90)
        sources.append(path)
    for folder in range(math.ceil(count / FOLDER_SIZE)):
        (inbox / f"batch-{folder:03d}").mkdir(parents=True)
    for i in range(count):
        os.link(sources[i % 16], inbox / f"batch-{i // FOLDER_SIZE:03d}" / f"p{i:06d}.jpg")


def write_config(work: Path) -> Path:
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["model"]["weights"] = str(ROOT / "weights" / "u2netp.safetensors")
    inbox = config["inboxes"][0]
    for key in ("path", "outbox", "done", "errors"):
        inbox[key] = str(work / key)
    config["metrics"] = {"listen": ""}
    config["journal"] = str(work / "journal.sqlite3")
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def published(journal: Path) -> list[float]:
    """Publication times (wall clock) of the successful jobs so far."""
    if not journal.exists():
        return []
    try:
        with sqlite3.connect(f"{journal.as_uri()}?mode=ro", uri=True, timeout=30) as db:
            rows = db.execute("SELECT published_at FROM jobs WHERE outcome = 'success'")
            return sorted(r[0] for r in rows if r[0] is not None)
    except sqlite3.OperationalError:  # the journal's schema not written yet
        return []


def one_backlog(count: int, window: float, where: Path) -> dict[str, float | int]:
    work = Path(tempfile.mkdtemp(prefix=f"backlog-{count}-", dir=where))
    try:
        make_backlog(work / "path", count)
        config = write_config(work)
        log = (work / "log").open("wb")
        started = time.time()
        daemon = subprocess.Popen(
            [sys.executable, __file__, "--daemon", "run", "--config", str(config), "--quiet"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            return measure(daemon, work / "journal.sqlite3", started, window, count)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=120)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(
    daemon: subprocess.Popen[bytes], journal: Path, started: float, window: float, count: int
) -> dict[str, float | int]:
    peak_rss, first = 0, None
    while first is None:
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited ({daemon.returncode})")
        peak_rss = max(peak_rss, rss_bytes(daemon.pid))
        times = published(journal)
        first = times[0] if times else None
        time.sleep(0.2)
    cpu_at, wall_at = thread_cpu(daemon.pid), time.time()
    while time.time() < first + window:
        peak_rss = max(peak_rss, rss_bytes(daemon.pid))
        time.sleep(0.5)
    cpu_end, wall_end = thread_cpu(daemon.pid), time.time()
    elapsed = wall_end - wall_at
    times = published(journal)
    in_window = sum(1 for t in times if first <= t < first + window)
    return {
        "files": count,
        "first_output_s": round(first - started, 2),
        "images_per_s": round(in_window / window, 3),
        "intake_cpu_share": round((cpu_end["intake"] - cpu_at.get("intake", 0.0)) / elapsed, 4),
        "process_cpu_share": round((sum(cpu_end.values()) - sum(cpu_at.values())) / elapsed, 3),
        "peak_rss_mb": round(peak_rss / 2**20, 1),
    }


# ----- one step, in this process ---------------------------------------------------------------


def micro(tracked: int, repeat: int = 20) -> dict[str, float | int]:
    """Seconds of one watcher step with ``tracked`` files waiting (synthetic, not due) and 10 real
    files due; of a quiet step; and bytes a tracked file costs."""
    from hotfolder import recipes
    from hotfolder.config import InboxConfig
    from hotfolder.watch import InboxWatcher, Pending

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        config = InboxConfig(
            name="m", path=root / "in", outbox=root / "out", done=None, errors=root / "err",
            settle_ms=1000, outputs=(recipes.Output(recipes.Kind.CUTOUT),),
        )  # fmt: skip
        config.path.mkdir()
        w = InboxWatcher(config, scan_interval=1e9, observe=False, limit=tracked + 100)
        w.step(0.0)  # the start-up scan of an empty inbox
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(tracked):
            key = f"batch-{i // FOLDER_SIZE:04d}/p{i:07d}.jpg"
            w.pending[key] = Pending(2000, 0, 0.0, 0.0)
            w._schedule(key, w.pending[key], 1e8 + i)  # settling, not due during the benchmark
        per_file = (tracemalloc.get_traced_memory()[0] - before) / tracked
        tracemalloc.stop()
        quiet, due, now = [], [], 1.0
        for _ in range(repeat):
            names = [f"r{i}.jpg" for i in range(10)]
            for name in names:
                (config.path / name).write_bytes(b"x")
                w._offer(name, now, by_scan=False)
            began = time.perf_counter()
            w.step(now + 0.5)
            quiet.append(time.perf_counter() - began)
            began = time.perf_counter()
            ready = w.step(now + 1.0)
            due.append(time.perf_counter() - began)
            assert len(ready) == 10
            for item in ready:
                (config.path / item.relative).unlink()
                w.done(item.relative)
            now += 2.0
    return {
        "tracked": tracked,
        "quiet_step_us": round(1e6 * sorted(quiet)[repeat // 2], 1),
        "step_10_due_us": round(1e6 * sorted(due)[repeat // 2], 1),
        "bytes_per_tracked_file": round(per_file),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--daemon":
        sys.exit(run_named(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[])
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--micro", type=int, nargs="*", default=[])
    parser.add_argument("--where", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results: dict[str, object] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_at_start": os.getloadavg(),
    }
    results["micro"] = [micro(n) for n in args.micro]
    for row in results["micro"]:  # type: ignore[attr-defined]
        print(row, flush=True)
    results["backlogs"] = []
    for size in args.sizes:
        row = one_backlog(size, args.window, args.where)
        row["load_average_after"] = round(os.getloadavg()[0], 2)
        results["backlogs"].append(row)  # type: ignore[attr-defined]
        print(row, flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
