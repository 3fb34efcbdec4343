"""What a user waits for: `hotfolder matte` of one photo and of 16, process start included,
with and without a running daemon, against rembg in the same run.

    python bench/first_photo.py --rounds 5 --out first_photo.json [--torch] [--cases TEXT]

The daemon and ``matte`` run the default runtime (ONNX Runtime on a CPU; the daemon's start
exports the model into the cache first); ``--torch`` adds ``matte`` without a daemon on PyTorch
(``model.runtime: torch``), for comparison.

Each round runs every case once, in turn, so that load from other processes falls on all of them
alike; the median wall-clock seconds per case over the rounds are reported, and the ratios to
rembg. Photos: 1 MP JPEGs (q92) cut from scikit-image's (``throughput.make_photos``). rembg runs
as ``throughput.rembg_like_p``: its own process, u2netp on ONNX Runtime, one file after another.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from throughput import ROOT, make_photos, rembg_like_p, start_daemon, wait_until, write_config

from hotfolder import handoff


def matte(config: Path, photos: list[Path], out: Path) -> float:
    """Seconds for `hotfolder matte` over ``photos``, process start to exit."""
    shutil.rmtree(out, ignore_errors=True)
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "hotfolder", "matte", "-q", "-c", str(config), "-o", str(out),
         *map(str, photos)],
        cwd=ROOT, check=True,
    )  # fmt: skip
    return time.monotonic() - started


def rembg(photos: list[Path], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    started = time.monotonic()
    rembg_like_p(photos, out)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-rembg", action="store_true")
    parser.add_argument("--torch", action="store_true", help="add matte on PyTorch, no daemon")
    parser.add_argument("--precision", default="auto", help="model.precision of daemon and matte")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--cases", default="", help="only the cases whose name holds this: '1 photo: matte, daemon'"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        photos = make_photos(work / "photos", 16, 1.0)
        config = write_config(work, "cpu", 16, 0)
        settings = yaml.safe_load(config.read_text())
        settings["model"]["precision"] = args.precision
        config.write_text(yaml.safe_dump(settings))
        on_torch = work / "torch.yaml"
        settings["model"].update(runtime="torch", precision="fp32")
        on_torch.write_text(yaml.safe_dump(settings))
        cases = ["matte, no daemon", "matte, daemon running", "rembg"]
        cases += ["matte, no daemon, PyTorch"] if args.torch else []
        sets = {"1 photo": photos[:1], "16 photos": photos}
        samples: dict[str, list[float]] = {}
        daemon = start_daemon(config, work / "daemon.log")
        try:
            socket = handoff.socket_path(work)
            wait_until(socket.exists, 300, daemon)
            for _ in range(args.rounds):
                for label, chosen in sets.items():
                    for case in cases:
                        if case == "rembg" and args.skip_rembg:
                            continue
                        if args.cases not in f"{label}: {case}":
                            continue
                        out = work / "out"
                        if case == "rembg":
                            seconds = rembg(chosen, out)
                        else:
                            # The same config either way: only whether the socket answers differs.
                            hidden = socket.with_name("moved.sock")
                            if "no daemon" in case:
                                socket.rename(hidden)
                            try:
                                torch = case.endswith("PyTorch")
                                seconds = matte(on_torch if torch else config, chosen, out)
                            finally:
                                if hidden.exists():
                                    hidden.rename(socket)
                        samples.setdefault(f"{label}: {case}", []).append(seconds)
                print(json.dumps({k: round(v[-1], 2) for k, v in samples.items()}), flush=True)
        finally:
            daemon.terminate()
            daemon.wait(60)
    report: dict[str, object] = {
        "median_s": {k: round(statistics.median(v), 3) for k, v in samples.items()},
        "all_s": {k: [round(s, 3) for s in v] for k, v in samples.items()},
    }
    if not args.skip_rembg and not args.cases:
        medians = report["median_s"]
        assert isinstance(medians, dict)
        report["speed_vs_rembg"] = {
            k: round(medians[f"{k.split(':')[0]}: rembg"] / v, 2)
            for k, v in medians.items()
            if "rembg" not in k
        }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
