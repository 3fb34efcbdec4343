"""Status page benchmark: what the page costs the daemon.

    python bench/status.py [--rows 10000] [--repeat 20] [--megapixels 1 12] [--browser]
                           [--out FILE]

Measures:
  (a) the page and its JSON endpoints over HTTP on the real listener, against a journal of
      ``--rows`` jobs (three inboxes, one in ten failed): median and worst of ``--repeat``
      requests each, cold connection per request as a browser polling every 5 s makes; with
      ``--browser``, the whole page in headless chromium until its first 25 jobs are drawn
      (thumbnails missing here: the journal is generated);
  (b) thumbnails per published image at each size: making them (shrink, checkerboard, five
      JPEGs) and writing them, next to encoding the cutout PNG that publishing does anyway,
      and their bytes on disk.
Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hotfolder import imaging, recipes, thumbnails  # noqa: E402
from hotfolder.journal import Journal  # noqa: E402
from hotfolder.metrics import Metrics, MetricsServer  # noqa: E402
from hotfolder.status import StatusPage  # noqa: E402

INBOXES = ("products", "portraits", "catalogue")


def fill(journal: Journal, rows: int) -> list[str]:
    """``rows`` finished jobs over the last day, newest last; returns their ids."""
    now = time.time()
    ids = []
    for n in range(rows):
        job = f"{n:032x}"
        at = now - (rows - n) * 86400 / rows
        failed = n % 10 == 0
        journal.begin(job, inbox=INBOXES[n % 3], path=f"shoot-{n // 100}/IMG_{n:05d}.jpg",
                      size=1_500_000, detected_at=at, claimed_at=at, attempts=1,
                      outcome="claimed", host="bench")  # fmt: skip
        journal.update(job, outcome="failed" if failed else "success",
                       published_at=None if failed else at + 0.4, inferred_at=at + 0.3,
                       batch_size=8, device="cpu", reason="corrupt" if failed else None,
                       error="is damaged" if failed else None,
                       outputs=[] if failed else [f"/srv/out/IMG_{n:05d}.png"])  # fmt: skip
        ids.append(job)
    return ids


def timed_get(url: str, repeat: int) -> dict[str, float]:
    times, size = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as response:
            size = len(response.read())
        times.append((time.perf_counter() - started) * 1000)
    return {"median_ms": round(statistics.median(times), 2), "max_ms": round(max(times), 2),
            "bytes": size}  # fmt: skip


def browser_load(base: str, folder: Path) -> dict[str, float]:
    """Headless chromium (see tests/browser.py): from navigation to the first 25 jobs drawn,
    five loads, each on a fresh tab state."""
    from tests.browser import open_page

    times = []
    with open_page("about:blank", folder / "profile", folder / "chromium.log") as page:
        for _ in range(5):
            page.send("Page.navigate", url="about:blank")
            started = time.perf_counter()
            page.send("Page.navigate", url=f"{base}/")
            page.wait("document.querySelectorAll('.job').length === 25", 60, "the jobs")
            times.append((time.perf_counter() - started) * 1000)
    return {"median_ms": round(statistics.median(times), 2), "max_ms": round(max(times), 2),
            "bytes": 0}  # fmt: skip


def page_times(rows: int, repeat: int, folder: Path, browser: bool) -> dict[str, dict[str, float]]:
    journal = Journal(folder / "journal.sqlite3")
    ids = fill(journal, rows)
    states = [{"name": n, "waiting": 0, "oldest_waiting_s": 0.0, "paused": False,
               "paused_why": [], "last_success": time.time()} for n in INBOXES]  # fmt: skip
    page = StatusPage(folder / "journal.sqlite3", thumbnails.Thumbnails(folder / "thumbs"),
                      lambda: [dict(s) for s in states])  # fmt: skip
    server = MetricsServer("127.0.0.1:0", Metrics(), lambda: (True, {}), lambda: (True, {}),
                           page.handle)  # fmt: skip
    server.start()
    base = f"http://127.0.0.1:{server.port}/status"
    middle = ids[rows // 2]
    cursor = json.loads(urllib.request.urlopen(f"{base}/api/jobs?limit=100").read())["next"]
    targets = {
        "page (index.html)": "/",
        "inboxes": "/api/inboxes",
        "jobs, first page of 25": "/api/jobs",
        "jobs, page 2 of 100 (cursor)": f"/api/jobs?limit=100&before={cursor}",
        "jobs, one inbox, failed": "/api/jobs?inbox=products&outcome=failed",
        "jobs, name search, matches": "/api/jobs?q=IMG_0999",
        "jobs, name search, no match (whole window)": "/api/jobs?q=nothing-like-this",
        "one job": f"/api/jobs/{middle}",
    }
    try:
        times = {name: timed_get(base + target, repeat) for name, target in targets.items()}
        if browser:
            times["whole page in chromium, until 25 jobs shown"] = browser_load(base, folder)
        return times
    finally:
        server.stop()
        journal.close()


def photo(megapixels: float) -> imaging.Picture:
    from skimage import data

    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    rgb = cv2.resize(data.astronaut(), (width, width * 3 // 4), interpolation=cv2.INTER_CUBIC)
    return imaging.Picture(np.ascontiguousarray(rgb), None)


def thumbnail_costs(megapixels: float, repeat: int, folder: Path) -> dict[str, float]:
    picture = photo(megapixels)
    height, width = picture.rgb.shape[:2]
    alpha = np.zeros((height, width), np.uint8)
    cv2.ellipse(alpha, (width // 2, height // 2), (width // 3, height // 2 - 1), 0, 0, 360,
                255, -1)  # fmt: skip
    alpha = cv2.GaussianBlur(alpha, (0, 0), 3)
    store = thumbnails.Thumbnails(folder / f"thumbs-{megapixels}")
    cutout = recipes.Output(recipes.Kind.CUTOUT)
    render, save, png = [], [], []
    for n in range(repeat):
        started = time.perf_counter()
        thumbnails.render(picture, alpha)
        render.append(time.perf_counter() - started)
        started = time.perf_counter()
        store.save(f"{n:032x}", picture, alpha)
        save.append(time.perf_counter() - started)
        started = time.perf_counter()
        recipes.render(cutout, picture, alpha)
        png.append(time.perf_counter() - started)
    return {
        "megapixels": round(width * height / 1e6, 2),
        "render_ms": round(statistics.median(render) * 1000, 2),
        "render_and_write_ms": round(statistics.median(save) * 1000, 2),
        "cutout_png_ms": round(statistics.median(png) * 1000, 2),
        "bytes_per_job": store.total_bytes // repeat,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--megapixels", type=float, nargs="+", default=[1.0, 12.0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--browser", action="store_true",
                        help="also load the whole page in headless chromium")  # fmt: skip
    args = parser.parse_args()
    cv2.setNumThreads(1)  # as in a publish thread: one image per core
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "rows": args.rows,
            "requests": page_times(args.rows, args.repeat, Path(tmp), args.browser),
            "thumbnails": [thumbnail_costs(mp, args.repeat, Path(tmp)) for mp in args.megapixels],
        }
    print(f"status page, journal of {args.rows} jobs, {args.repeat} requests each:")
    for name, figures in results["requests"].items():
        print(f"  {name:44} median {figures['median_ms']:7.2f} ms  max {figures['max_ms']:7.2f} ms"
              f"  {figures['bytes']:7d} bytes")  # fmt: skip
    print("thumbnails per image (median):")
    for t in results["thumbnails"]:
        print(f"  {t['megapixels']:5.2f} MP: make {t['render_ms']:6.2f} ms, make and write "
              f"{t['render_and_write_ms']:6.2f} ms (the cutout PNG alone: {t['cutout_png_ms']:6.2f}"
              f" ms), {t['bytes_per_job']} bytes")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
