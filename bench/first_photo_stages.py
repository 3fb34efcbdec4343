"""Where `hotfolder matte` of one photo through a running daemon spends its time, stage by stage.

    python bench/first_photo_stages.py --rounds 9

Starts a daemon as ``first_photo.py`` does, then runs ``hotfolder matte`` of one 1 MP JPEG
``--rounds`` times, each in a process of its own that times its stages by wrapping the functions
that do them (nothing else changes): the interpreter's start, the imports, the connection and the
daemon's greeting, reading and decoding the photo, the request (sending the picture, the daemon's
model, the reply), rendering the cutout (foreground colours and PNG), writing it, the rest of the
command, and the process's exit after the command returned. Prints the median and range of each
in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from throughput import ROOT, make_photos, start_daemon, wait_until, write_config

from hotfolder import handoff

TRACED = """
import json, os, sys, time
started = time.time()
stages = {"interpreter start": started - float(os.environ["SPAWNED_AT"])}
import hotfolder.cli as cli
from hotfolder import handoff, imaging, matte, oneshot, recipes
stages["imports"] = time.time() - started

def timed(owner, name, stage):
    function = getattr(owner, name)
    def wrapper(*args, **kwargs):
        begun = time.time()
        try:
            return function(*args, **kwargs)
        finally:
            stages[stage] = stages.get(stage, 0) + time.time() - begun
    setattr(owner, name, wrapper)

timed(oneshot, "choose", "connect and greeting")
timed(imaging, "read_file", "read and decode")
timed(imaging, "decode", "read and decode")
timed(handoff.Client, "predict", "request: send, model, reply")
timed(recipes, "render_all", "render (foreground, PNG)")
timed(matte, "write_atomic", "write")
begun = time.time()
args = cli.parse(sys.argv[1:])
code = cli.dispatch(args)
inner = sum(v for k, v in stages.items() if k not in ("interpreter start", "imports"))
stages["rest of the command"] = time.time() - begun - inner
stages["returned at"] = time.time()
print(json.dumps(stages), file=sys.stderr, flush=True)
cli.leave(code) if args.command == "matte" else sys.exit(code)
"""


def traced_matte(config: Path, photo: Path, out: Path) -> dict[str, float]:
    """Seconds per stage of one `hotfolder matte` of ``photo``, and in all."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "SPAWNED_AT": repr(time.time())}
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-c", TRACED, "matte", "-q", "-c", str(config), "-o", str(out),
         str(photo)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    ended = time.time()
    stages: dict[str, float] = json.loads(done.stderr.strip().splitlines()[-1])
    stages["exit"] = ended - stages.pop("returned at")
    stages["in all"] = ended - started
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        photo = make_photos(work / "photos", 1, 1.0)[0]
        config = write_config(work, "cpu", 16, 0)
        daemon = start_daemon(config, work / "daemon.log")
        try:
            wait_until(handoff.socket_path(work).exists, 300, daemon)
            runs = [traced_matte(config, photo, work / "out") for _ in range(args.rounds)]
        finally:
            daemon.terminate()
            daemon.wait(60)
    for stage in runs[0]:
        ms = [run[stage] * 1000 for run in runs]
        median, low, high = statistics.median(ms), min(ms), max(ms)
        print(f"{stage:30s} median {median:5.0f} ms   range {low:4.0f}–{high:4.0f}")


if __name__ == "__main__":
    main()
