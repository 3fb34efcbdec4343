"""The status page: thumbnails made at publish time and kept under a cap, the read-only JSON
endpoints over a real journal, and the page itself in a real headless browser against a live
daemon processing real photos, hostile names included."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import socket
import sqlite3
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from hotfolder import imaging, names
from hotfolder.journal import Journal
from hotfolder.metrics import SECURITY_HEADERS, Metrics, MetricsServer
from hotfolder.roots import Pause, Root
from hotfolder.status import RATE_SQL, StatusPage, inbox_states, jobs_query
from hotfolder.thumbnails import LARGE, SMALL, Thumbnails

from . import corpus
from .browser import Page, open_page
from .conftest import ROOT
from .daemon import Site, metrics_url, start, stop, wait_for

OUTPUT = ROOT / "tests" / "output"  # artefacts (screenshots), ignored by git
HOSTILE = [
    b"<img src=x onerror=alert(1)>.jpg",
    b"\"quoted\" & 'single'.jpg",
    b"line\nbreak.jpg",
    b"caf\xe9.jpg",
]


def job_id(n: int) -> str:
    return f"{n:032x}"


def matte(photo: np.ndarray) -> np.ndarray:
    """A real-looking alpha: an opaque ellipse on a transparent background, (H, W) uint8."""
    height, width = photo.shape[:2]
    alpha = np.zeros((height, width), np.uint8)
    cv2.ellipse(alpha, (width // 2, height // 2), (width // 4, height // 3), 0, 0, 360, 255, -1)
    return alpha


def test_thumbnails_are_small_jpegs_with_the_cutout_on_a_checkerboard(
    tmp_path: Path, photos: dict[str, np.ndarray]
) -> None:
    photo = photos["rocket"]  # 427×640: portrait
    store = Thumbnails(tmp_path / "thumbs")
    store.save(job_id(1), imaging.Picture(photo, None), matte(photo))
    sizes = {}
    for view in ("before", "after", "before-large", "after-large", "mask-large"):
        path = store.path(job_id(1), view)
        assert path is not None
        decoded = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
        sizes[view] = max(decoded.shape[:2])
    assert sizes == {"before": SMALL, "after": SMALL, "before-large": LARGE,
                     "after-large": LARGE, "mask-large": LARGE}  # fmt: skip
    after_path = store.path(job_id(1), "after-large")
    assert after_path is not None
    after = cv2.imdecode(np.frombuffer(after_path.read_bytes(), np.uint8), cv2.IMREAD_GRAYSCALE)
    corner = after[:32, :32].astype(int)  # transparent there: the board shows, grey and white
    assert abs(corner.min() - 204) < 12
    assert abs(corner.max() - 255) < 12


@pytest.mark.parametrize("shape", [(1, 2000), (3000, 1), (1, 1), (700, 513)])
def test_thumbnails_of_extreme_shapes(tmp_path: Path, shape: tuple[int, int]) -> None:
    """A one-pixel-high panorama has thumbnails too (at least one pixel high)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    store = Thumbnails(tmp_path / "thumbs")
    store.save(job_id(1), imaging.Picture(rgb, None), np.full(shape, 200, np.uint8))
    path = store.path(job_id(1), "after")
    assert path is not None
    decoded = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    assert max(decoded.shape[:2]) == min(max(shape), SMALL)
    assert min(decoded.shape[:2]) >= 1


def test_thumbnails_stay_under_the_cap_oldest_first(
    tmp_path: Path, photos: dict[str, np.ndarray]
) -> None:
    photo = photos["coffee"]
    picture, alpha = imaging.Picture(photo, None), matte(photo)
    probe = Thumbnails(tmp_path / "probe")
    probe.save(job_id(0), picture, alpha)
    one_job = probe.total_bytes
    store = Thumbnails(tmp_path / "thumbs", max_bytes=int(one_job * 3.5))
    for n in range(1, 7):
        store.save(job_id(n), picture, alpha)
        time.sleep(0.01)  # distinct modification times, for the reload below
    kept = sorted({p.name.split(".")[0] for p in (tmp_path / "thumbs").iterdir()})
    assert kept == [job_id(4), job_id(5), job_id(6)]
    assert store.total_bytes <= store.max_bytes
    # A restart knows what is there, oldest first: the next job evicts job 4, not job 6.
    again = Thumbnails(tmp_path / "thumbs", max_bytes=store.max_bytes)
    again.save(job_id(7), picture, alpha)
    kept = sorted({p.name.split(".")[0] for p in (tmp_path / "thumbs").iterdir()})
    assert kept == [job_id(5), job_id(6), job_id(7)]


def test_a_job_whose_pictures_cannot_all_be_written_leaves_none(
    tmp_path: Path, photos: dict[str, np.ndarray]
) -> None:
    """A write that fails part way (a full disk; here a folder where a picture belongs) leaves
    no temporary file and no half of a job's pictures: nothing the cap does not count."""
    photo = photos["coffee"]
    folder = tmp_path / "thumbs"
    (folder / f"{job_id(1)}.after-large.jpg").mkdir(parents=True)
    (folder / f".{job_id(0)}.before.jpg.tmp").write_bytes(b"half")  # a crash's: gone at start
    store = Thumbnails(folder)
    store.save(job_id(1), imaging.Picture(photo, None), matte(photo))
    assert sorted(p.name for p in folder.iterdir()) == [f"{job_id(1)}.after-large.jpg"]
    assert store.total_bytes == 0


@pytest.mark.parametrize("cap", [0, 1])
def test_a_lower_cap_at_start_deletes_the_oldest_pictures_at_once(
    tmp_path: Path, photos: dict[str, np.ndarray], cap: int
) -> None:
    """Pictures an earlier run kept are trimmed to the cap as the daemon starts, not at the next
    job: with ``thumbnails_mb: 0`` none are left to show."""
    photo = photos["coffee"]
    picture, alpha = imaging.Picture(photo, None), matte(photo)
    store = Thumbnails(tmp_path / "thumbs")
    for n in range(3):
        store.save(job_id(n), picture, alpha)
        time.sleep(0.01)  # distinct modification times: the order a restart sees
    one_job = store.total_bytes // 3
    again = Thumbnails(tmp_path / "thumbs", max_bytes=cap * one_job)
    kept = sorted({p.name.split(".")[0] for p in (tmp_path / "thumbs").iterdir()})
    assert kept == [job_id(n) for n in range(3 - cap, 3)]
    assert again.total_bytes <= again.max_bytes


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Journal]]:
    """A status page on a real journal and a real listener (no daemon)."""
    journal = Journal(tmp_path / "journal.sqlite3")
    thumbnails = Thumbnails(tmp_path / "thumbnails")
    page = StatusPage(tmp_path / "journal.sqlite3", thumbnails, lambda: [])
    server = MetricsServer("127.0.0.1:0", Metrics(), lambda: (True, {}), lambda: (True, {}),
                           page.handle)  # fmt: skip
    server.start()
    yield f"http://127.0.0.1:{server.port}", journal
    server.stop()
    journal.close()


def get(url: str) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read(), dict(error.headers)


def add_jobs(journal: Journal, count: int, start: float = 1_000_000.0) -> None:
    for n in range(count):
        outcome = "failed" if n % 3 == 0 else "success"
        journal.begin(job_id(n), inbox="a" if n % 2 else "b", path=f"photo-{n}.jpg", size=10,
                      detected_at=start + n, claimed_at=start + n, attempts=1,
                      outcome="claimed")  # fmt: skip
        journal.update(job_id(n), outcome=outcome, published_at=start + n + 0.5,
                       reason="corrupt" if outcome == "failed" else None)  # fmt: skip


def test_jobs_are_paged_newest_first_and_filtered(served: tuple[str, Journal]) -> None:
    url, journal = served
    add_jobs(journal, 30)
    seen, cursor = [], ""
    while True:
        status, body, _ = get(f"{url}/status/api/jobs?limit=7&before={cursor}")
        assert status == 200
        page = json.loads(body)
        seen += [job["id"] for job in page["jobs"]]
        if not page["next"]:
            break
        cursor = page["next"]
    assert seen == [job_id(n) for n in reversed(range(30))]
    _, body, _ = get(f"{url}/status/api/jobs?inbox=a&outcome=failed&limit=100")
    assert [j["id"] for j in json.loads(body)["jobs"]] == [job_id(n) for n in (27, 21, 15, 9, 3)]
    _, body, _ = get(f"{url}/status/api/jobs?q=PHOTO-1&limit=100")
    assert {j["path"] for j in json.loads(body)["jobs"]} == {"photo-1.jpg"} | {
        f"photo-{n}.jpg" for n in range(10, 20)
    }
    _, body, _ = get(f"{url}/status/api/jobs?limit=100000")
    assert len(json.loads(body)["jobs"]) == 30  # capped at 100 a page


def test_a_filter_or_cursor_the_page_cannot_apply_is_refused(served: tuple[str, Journal]) -> None:
    """An unknown outcome or a damaged cursor is a 400 that says so: answering every job, or the
    first page again, would pass for a filtered list or the next page (a script paging on
    ``next`` would loop for ever)."""
    url, journal = served
    add_jobs(journal, 3)
    for query in ("outcome=error", "outcome=FAILED", "before=abc", f"before=-1_{job_id(1)}",
                  f"before=1e9_{job_id(1)}", "before=1000001.0"):  # fmt: skip
        status, body, _ = get(f"{url}/status/api/jobs?{query}")
        assert status == 400, query
        assert body.startswith(query.split("=")[0].encode() + b": "), body
    for query in ("outcome=", "before=", "outcome=failed", f"before=1000001.0_{job_id(1)}"):
        assert get(f"{url}/status/api/jobs?{query}")[0] == 200, query


def test_requests_never_reach_the_filesystem_by_path(
    served: tuple[str, Journal], tmp_path: Path
) -> None:
    url, journal = served
    add_jobs(journal, 1)
    (tmp_path / "secret.jpg").write_bytes(b"secret")
    for target in (
        "/status/thumbs/../secret.jpg/before",
        "/status/thumbs/..%2f..%2fsecret/before",
        f"/status/thumbs/{job_id(0)}/../../secret.jpg",
        f"/status/thumbs/{job_id(0)}/before.jpg",
        "/status/../journal.sqlite3",
        "/status/api/jobs/..%2f..",
        "/status/index.html",
        "/status/static/app.js",
    ):
        status, body, _ = get(url + target)
        assert status == 404, target
        assert b"secret" not in body
    status, _, headers = get(f"{url}/status/")
    assert status == 200
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    request = urllib.request.Request(f"{url}/status/api/jobs", method="POST", data=b"{}")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    refused.value.close()
    assert refused.value.code == 501  # nothing is written through the page


def test_refusals_carry_the_security_headers_too(served: tuple[str, Journal]) -> None:
    """The answers the HTTP server makes itself (a method other than GET, a request line too
    long) are HTML pages from the same origin: they carry the same headers as the page."""
    url, _ = served
    policy = SECURITY_HEADERS["Content-Security-Policy"]
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "HEAD"):
        request = urllib.request.Request(f"{url}/status/api/jobs", method=method)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        refused.value.close()
        assert refused.value.code == 501, method
        assert refused.value.headers["Content-Security-Policy"] == policy, method
        assert refused.value.headers["X-Content-Type-Options"] == "nosniff", method
    status, _, headers = get(f"{url}/status/api/jobs?q={'a' * 70_000}")
    assert status == 414
    assert headers["Content-Security-Policy"] == policy


def test_a_client_that_leaves_mid_answer_is_no_error(
    served: tuple[str, Journal], capfd: pytest.CaptureFixture[str]
) -> None:
    """A browser that leaves the page while an answer is on its way (the 5 s refresh, a
    thumbnail half sent) is routine: no traceback in the daemon's log for each one."""
    url, journal = served
    add_jobs(journal, 100)
    port = int(url.rsplit(":", 1)[1])
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"GET /status/api/jobs?limit=100 HTTP/1.1\r\nHost: x\r\n\r\n")
            # Closed at once with a reset: the answer finds the connection gone.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wait_for(lambda: not any("process_request" in t.name for t in threading.enumerate()), 60,
             "the answers to end")  # fmt: skip
    assert "Traceback" not in capfd.readouterr().err


def test_a_client_that_sends_nothing_is_let_go(tmp_path: Path) -> None:
    """A connection that never sends its request does not hold a thread of the listener for
    ever (thousands of them would exhaust the daemon's threads)."""
    server = MetricsServer("127.0.0.1:0", Metrics(), lambda: (True, {}), lambda: (True, {}),
                           client_timeout=1)  # fmt: skip
    server.start()
    assert inspect.signature(MetricsServer).parameters["client_timeout"].default == 30
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as client:
        client.sendall(b"GET /status/ HTTP/1.1\r\n")  # and never the rest
        assert client.recv(1024) == b""  # closed by the server
    wait_for(lambda: not any("process_request" in t.name for t in threading.enumerate()), 60,
             "the handler thread to end")  # fmt: skip
    server.stop()


def test_inboxes_show_backlog_last_success_and_why_intake_is_paused(tmp_path: Path) -> None:
    metrics = Metrics()
    metrics.add_inbox("products")
    metrics.pending.labels("products").set(7)
    metrics.oldest_pending.labels("products").set(42.5)
    metrics.last_success.labels("products").set(1_700_000_000)
    pause = Pause(1.0)
    states = inbox_states(lambda: ["products"], metrics.registry, pause.reasons)
    page = StatusPage(tmp_path / "journal.sqlite3", Thumbnails(tmp_path / "t"), states)
    assert page.inbox_rows() == [
        {"name": "products", "waiting": 7, "oldest_waiting_s": 42.5, "paused": False,
         "paused_why": [], "last_success": 1_700_000_000, "images_per_min": 0},
    ]  # fmt: skip
    pause.hold(Root.of(tmp_path), "disk_full", time.monotonic())
    assert page.inbox_rows()[0]["paused_why"] == ["disk_full"]


def test_a_journal_that_cannot_be_read_is_a_503(tmp_path: Path) -> None:
    (tmp_path / "journal.sqlite3").write_bytes(b"not a database\n" * 100)
    page = StatusPage(tmp_path / "journal.sqlite3", Thumbnails(tmp_path / "t"), lambda: [])
    server = MetricsServer("127.0.0.1:0", Metrics(), lambda: (True, {}), lambda: (True, {}),
                           page.handle)  # fmt: skip
    server.start()
    try:
        status, body, _ = get(f"http://127.0.0.1:{server.port}/status/api/jobs")
    finally:
        server.stop()
    assert status == 503
    assert body.startswith(b"the journal cannot be read")


@pytest.mark.parametrize(
    "query",
    [{}, {"inbox": "a"}, {"outcome": "failed"}, {"inbox": "a", "outcome": "success"},
     {"before": f"1000010.0_{job_id(10)}"}, {"q": "photo", "inbox": "b"}],
)  # fmt: skip
def test_every_query_reads_through_an_index(tmp_path: Path, query: dict[str, str]) -> None:
    """No request walks the table: each query searches an index, or walks the time index
    newest first under a LIMIT (it stops there)."""
    journal = Journal(tmp_path / "journal.sqlite3")
    add_jobs(journal, 50)
    sql, values = jobs_query(query)
    plans = {
        "rate": plan(tmp_path, RATE_SQL, [0.0]),
        "jobs": plan(tmp_path, sql, [*values, 26]),
    }
    journal.close()
    assert "SEARCH jobs USING INDEX jobs_by_publication" in plans["rate"][0]
    for line in plans["jobs"]:
        if "jobs" in line.split():
            assert line.startswith("SEARCH jobs USING") or (
                line == "SCAN jobs USING INDEX jobs_by_time"
            ), plans["jobs"]


def plan(folder: Path, sql: str, values: list[object]) -> list[str]:
    with contextlib.closing(sqlite3.connect(folder / "journal.sqlite3")) as db:
        return [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", values)]


# ----- the page in a real browser, on a live daemon -----------------------------------------


def drop(site: Site, photos: dict[str, np.ndarray]) -> dict[bytes, str]:
    """Real photos (the samples and generated ones), hostile names, and a file that fails;
    returns each name with the outcome it must have."""
    expected = {}
    for sample in sorted((ROOT / "samples").glob("*.jpg")):
        shutil.copy(sample, site.inbox / sample.name)
        expected[sample.name.encode()] = "success"
    for name, photo in photos.items():
        (site.inbox / f"{name}-generated.png").write_bytes(corpus.png(photo))
        expected[f"{name}-generated.png".encode()] = "success"
    photo = corpus.jpeg(photos["chelsea"])
    for name in HOSTILE:
        with open(os.path.join(os.fsencode(site.inbox), name), "wb") as f:
            f.write(photo)
        expected[name] = "success"
    bad = b"<svg onload=alert(2)> not a photo.jpg"
    with open(os.path.join(os.fsencode(site.inbox), bad), "wb") as f:
        f.write(b"just some text\n")
    expected[bad] = "failed"
    return expected


@pytest.mark.browser
@pytest.mark.timeout(600)
def test_the_page_shows_the_jobs_with_their_pictures(
    site: Site, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    site.write_config()
    site.inbox.mkdir(parents=True)
    log = tmp_path / "daemon.log"
    daemon = start(site.config, log=log)
    try:
        base = metrics_url(log)
        expected = drop(site, photos)
        wait_for(lambda: sum(r["outcome"] != "claimed" for r in site.rows()) == len(expected),
                 300, "every file to finish", interval=0.5)  # fmt: skip
        shown = {names.escape(os.fsdecode(n)): outcome for n, outcome in expected.items()}
        with open_page(f"{base}/status/", tmp_path / "profile", tmp_path / "chromium.log") as page:
            check_list(page, shown)
            page.screenshot(OUTPUT / "status-page.png")
            check_filter(page)
            check_refresh(page, site, photos)
            check_phone(page)
            check_detail(page, site)
            page.screenshot(OUTPUT / "status-job.png")
            assert page.dialogs() == []  # no name ran a script
    finally:
        assert stop(daemon) == 0


ALL_THUMBNAILS = "[...document.querySelectorAll('.job img')]"


def check_list(page: Page, shown: dict[str, str]) -> None:
    page.wait(f"document.querySelectorAll('.job').length === {len(shown)}", 60, "every job listed")
    page.wait(f"{ALL_THUMBNAILS}.length > 0 && {ALL_THUMBNAILS}.every(i => i.complete)", 60,
              "thumbnails loaded")  # fmt: skip
    widths = page.evaluate(f"{ALL_THUMBNAILS}.map(i => i.naturalWidth)")
    succeeded = sum(o == "success" for o in shown.values())
    assert len(widths) == 2 * succeeded  # before and after for each published photo
    assert all(w > 0 for w in widths)
    listed = page.evaluate(
        "Object.fromEntries([...document.querySelectorAll('.job')].map("
        "j => [j.querySelector('a.name').textContent, j.dataset.outcome]))"
    )
    assert listed == shown  # every name as text, exactly as the journal escapes it
    # Nothing a name holds became an element: no <img src=x>, no <script> from a name.
    assert page.evaluate("document.querySelectorAll('img[src=\"x\"], .jobs script').length") == 0
    reason = page.evaluate("document.querySelector('.job[data-outcome=failed] .reason')"
                           ".textContent")  # fmt: skip
    assert reason.startswith("unsupported_format: ")
    inbox = page.evaluate("document.querySelector('.inbox').textContent")
    assert "products" in inbox
    assert "running" in inbox


def check_detail(page: Page, site: Site) -> None:
    hostile = names.escape(os.fsdecode(HOSTILE[0]))
    row = next(r for r in site.rows() if r["path"] == hostile)
    page.evaluate(f"location.hash = '#job={row['id']}'")
    page.wait("document.querySelectorAll('#d-pictures img').length === 3 && "
              "[...document.querySelectorAll('#d-pictures img')].every("
              "i => i.complete && i.naturalWidth > 0)", 60, "the job's pictures")  # fmt: skip
    assert page.evaluate("document.getElementById('d-name').textContent") == hostile
    outputs = page.evaluate(
        "[...document.querySelectorAll('#d-outputs li')].map(i => i.textContent)"
    )
    assert len(outputs) == 2  # cutout and mask, each with its size
    assert all("bytes)" in o for o in outputs)


def check_filter(page: Page) -> None:
    """Choosing an outcome lists only those jobs; choosing "all" again lists every one."""
    count = page.evaluate("document.querySelectorAll('.job').length")
    choose = ("(() => {{ const s = document.getElementById('f-outcome'); s.value = '{}'; "
              "s.dispatchEvent(new Event('change')); }})()")  # fmt: skip
    page.evaluate(choose.format("failed"))
    page.wait("document.querySelectorAll('.job').length === 1", 30, "only the failed job")
    assert page.evaluate("document.querySelector('.job').dataset.outcome") == "failed"
    page.evaluate(choose.format(""))
    page.wait(f"document.querySelectorAll('.job').length === {count}", 30, "every job again")


def check_refresh(page: Page, site: Site, photos: dict[str, np.ndarray]) -> None:
    """A photo dropped while the page is open appears on it, without the page reloading."""
    page.evaluate("window.stillTheSamePage = true")
    (site.inbox / "dropped later.jpg").write_bytes(corpus.jpeg(photos["coffee"]))
    page.wait("[...document.querySelectorAll('.job a.name')].some("
              "a => a.textContent === 'dropped later.jpg')", 120, "the new job")  # fmt: skip
    assert page.evaluate("window.stillTheSamePage") is True


def check_phone(page: Page) -> None:
    """On a phone's screen the page fits its width (nothing to scroll sideways)."""
    page.send("Emulation.setDeviceMetricsOverride", width=390, height=844,
              deviceScaleFactor=2, mobile=True)  # fmt: skip
    page.wait("innerWidth === 390", 30, "the phone's viewport")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390
    page.screenshot(OUTPUT / "status-phone.png")
    page.send("Emulation.clearDeviceMetricsOverride")
