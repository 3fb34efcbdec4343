"""Any name, any folder, against a live daemon: every input ends as one complete output set or
one errors/ entry with a reason, a good file dropped after each bad one is still processed, and
the daemon never exits. Every file is generated here; nothing is a binary fixture.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from hotfolder import names

from . import corpus
from .daemon import (
    Site,
    dead_owner,
    photo_jpegs,
    start,
    stop,
    wait_for,
    wait_serving,
    without_root_powers,
)

pytestmark = [pytest.mark.hostile, pytest.mark.timeout(600)]
PUBLISHED = "published"


@dataclass
class Case:
    """One input: its name (bytes, as on disk), how to make it, and how it must end."""

    name: bytes
    make: Callable[[Path], None]
    expect: str  # PUBLISHED or a reason code


def data_file(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def image_cases(photos: dict[str, np.ndarray]) -> list[Case]:
    coffee = photos["coffee"]
    gray = coffee[:, :, 0]
    photo = corpus.jpeg(coffee)
    palette = Image.fromarray(coffee).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    rgba = np.dstack([coffee, np.full(gray.shape, 200, np.uint8)])
    animated = corpus.encoded(Image.fromarray(coffee), "GIF", save_all=True,
                              append_images=[Image.fromarray(coffee[::-1].copy())])  # fmt: skip

    huge = corpus.encoded(Image.new("RGB", (10_000, 10_000), (200, 30, 40)), "JPEG")

    def unreadable(path: Path) -> None:
        path.write_bytes(photo)
        path.chmod(0)

    def fifo(path: Path) -> None:
        os.mkfifo(path)

    def link_to_passwd(path: Path) -> None:
        path.symlink_to("/etc/passwd")

    return [
        Case(os.fsencode("caf") + b"\xe9.jpg", data_file(photo), PUBLISHED),  # Latin-1
        Case(b"caf\xe9-bad.jpg", data_file(b"not a photo\n"), "unsupported_format"),
        Case(("字" * 80 + ".jpg").encode(), data_file(b"not a photo\n"), "unsupported_format"),
        Case(b"g" * 251 + b".jpg", data_file(photo), PUBLISHED),  # 255 bytes
        Case(b"g" * 251 + b".jpg", data_file(photo), PUBLISHED),  # the same name again
        Case(unicodedata.normalize("NFC", "café.jpg").encode(), data_file(photo), PUBLISHED),
        Case(unicodedata.normalize("NFD", "café.jpg").encode(), data_file(photo), PUBLISHED),
        Case(b"with spaces (1) & 'quotes\".jpg", data_file(photo), PUBLISHED),
        Case(b"<img src=x onerror=alert(1)>.jpg", data_file(photo), PUBLISHED),
        Case(b"line\nbreak.jpg", data_file(photo), PUBLISHED),
        Case(b"back\\slash.jpg", data_file(photo), PUBLISHED),
        Case(b"a/same.jpg", data_file(photo), PUBLISHED),
        Case(b"b/same.jpg", data_file(photo), PUBLISHED),
        Case(b"folder.jpg/inside.jpg", data_file(photo), PUBLISHED),
        Case(b"text.jpg", data_file(b"just some text\n"), "unsupported_format"),
        Case(b"empty.jpg", data_file(b""), "empty"),
        Case(b"truncated.jpg", data_file(corpus.truncated_jpeg(coffee)), "corrupt"),
        Case(
            b"huge-header.png", data_file(corpus.png_claiming(100_000, 100_000)), "too_many_pixels"
        ),
        Case(
            b"cmyk.jpg",
            data_file(corpus.encoded(Image.fromarray(coffee).convert("CMYK"), "JPEG")),
            PUBLISHED,
        ),
        Case(
            b"gray16.png",
            data_file(corpus.encoded(Image.fromarray(gray.astype(np.uint16) * 257), "PNG")),
            PUBLISHED,
        ),
        Case(b"gray.jpg", data_file(corpus.jpeg(gray)), PUBLISHED),
        Case(b"real-100mp.jpg", data_file(huge), "too_many_pixels"),  # over limits.max_pixels
        Case(b"palette.png", data_file(corpus.encoded(palette, "PNG")), PUBLISHED),
        Case(b"rgba.png", data_file(corpus.png(rgba)), PUBLISHED),
        Case(b"animated.gif", data_file(animated), "unsupported_format"),
        Case(b"phone.jpg", data_file(corpus.exif_rotated_jpeg(coffee, 6)), PUBLISHED),
        Case(b"pipe.jpg", fifo, "not_a_file"),
        Case(b"passwd.jpg", link_to_passwd, "not_a_file"),
        Case(b"locked.jpg", unreadable, "unreadable"),
    ]


def relative(case: Case) -> str:
    return os.fsdecode(case.name)


def outcomes(site: Site) -> dict[str, list[str]]:
    """Escaped input path -> the outcome (or failure reason) of each finished job."""
    ended: dict[str, list[str]] = {}
    for row in site.rows() if site.journal.exists() else []:
        if row["outcome"] in ("success", "failed"):
            result = PUBLISHED if row["outcome"] == "success" else str(row["reason"])
            ended.setdefault(str(row["path"]), []).append(result)
    return ended


def finished(site: Site, count: int) -> bool:
    """At least ``count`` jobs in the journal, and every one of them ended."""
    rows = site.rows() if site.journal.exists() else []
    return len(rows) >= count and all(r["outcome"] in ("success", "failed") for r in rows)


def test_every_name_and_kind_ends_right_and_the_daemon_stays_up(
    site: Site, photos: dict[str, np.ndarray]
) -> None:
    # Empty and cut-short files are refused once unchanged for the grace time; a real 100 MP
    # photo is over this config's pixel limit.
    site.write_config(settle_ms=100, inbox={"incomplete_grace_ms": 1000},
                      limits={"max_pixels": 50_000_000})  # fmt: skip
    log = site.root / "log"
    daemon = start(site.config, "--log-format", "json", log=log, prefix=without_root_powers())
    good = photo_jpegs(photos, 1, size=64)[0]
    cases = image_cases(photos)
    try:
        wait_serving(log)
        for index, case in enumerate(cases):
            path = site.inbox / relative(case)
            path.parent.mkdir(parents=True, exist_ok=True)
            case.make(path)
            after = f"good-{index:02d}.jpg"
            corpus.write(site.inbox, after, good)
            shown = names.escape(relative(case))
            expected = [c.expect for c in cases[: index + 1] if c.name == case.name]

            def ended(shown: str = shown, after: str = after, count: int = len(expected)) -> bool:
                seen = outcomes(site)
                return len(seen.get(shown, [])) == count and after in seen

            wait_for(ended, 60, f"{shown} and the good file after it")
            assert daemon.poll() is None, f"the daemon exited after {shown}"
            assert outcomes(site)[shown] == expected, shown
            assert outcomes(site)[after] == [PUBLISHED]
    finally:
        assert stop(daemon) == 0

    assert site.visible_inbox_files() == []
    check_published(site, cases)
    check_rejected(site, cases)
    check_logs(log)
    check_history(site)


def check_published(site: Site, cases: list[Case]) -> None:
    """One complete output set per published input, named by its input, mask and cutout of the
    input's own size; originals in done/, a re-upload under a job-tagged name."""
    for row in site.rows():
        if row["outcome"] != "success":
            continue
        outputs = [Path(names.unescape(o)) for o in json.loads(str(row["outputs"]))]
        assert len(outputs) == 2
        sizes = set()
        for output in outputs:
            assert names.byte_length(output.name) <= 255
            with Image.open(output) as image:
                image.load()
                sizes.add(image.size)
        assert len(sizes) == 1, row["path"]
    done = {os.fsencode(p) for p in site.files(site.done)}
    long_name = b"g" * 251 + b".jpg"
    assert long_name in done
    tagged = [p for p in done if p.startswith(b"g" * 200) and p != long_name]
    assert len(tagged) == 1
    assert len(tagged[0]) <= 255
    assert os.fsencode("caf") + b"\xe9.jpg" in done
    assert (site.outbox / os.fsdecode(b"caf\xe9.png")).is_file()
    assert (site.outbox / "line_break.png").is_file()


def check_rejected(site: Site, cases: list[Case]) -> None:
    """Each rejected file in errors/ with a sidecar that fits NAME_MAX and names it (escaped)."""
    reports = {}
    for sidecar in site.errors.rglob("*.error.json"):
        assert names.byte_length(sidecar.name) <= 255
        report = json.loads(sidecar.read_text(encoding="utf-8"))
        reports[report["file"]] = report["reason"]
    expected = {names.escape(relative(c)): c.expect for c in cases if c.expect != PUBLISHED}
    assert reports == expected
    for case in cases:
        if case.expect != PUBLISHED:
            assert os.path.lexists(site.errors / relative(case)), case.name


def check_history(site: Site) -> None:
    """`hotfolder history` shows the names escaped, one job a line."""
    command = [sys.executable, "-m", "hotfolder", "history", "--config", str(site.config),
               "--limit", "200"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, check=True, timeout=120)
    text = result.stdout.decode("utf-8")  # valid UTF-8, whatever the names
    assert "caf\\xe9.jpg" in text
    assert "line\\x0abreak.jpg" in text
    assert len(text.splitlines()) == len(site.rows()) + 1  # a header, then a line per job


def check_logs(log: Path) -> None:
    """JSON logs: every line parses, and names appear escaped, never as raw bytes."""
    paths = set()
    for line in log.read_bytes().splitlines():
        record = json.loads(line.decode("utf-8"))
        if "path" in record:
            paths.add(record["path"])
    assert "caf\\xe9.jpg" in paths
    assert "line\\x0abreak.jpg" in paths


def test_two_inputs_that_would_share_an_output_name_keep_both(
    site: Site, photos: dict[str, np.ndarray]
) -> None:
    site.write_config(settle_ms=100)
    corpus.write(site.inbox, "item.jpg", corpus.jpeg(photos["chelsea"]))  # 451×300
    corpus.write(site.inbox, "item.png", corpus.png(photos["coffee"]))  # 600×400
    log = site.root / "log"
    daemon = start(site.config, log=log)
    try:
        wait_for(lambda: len(site.files(site.done)) == 2, 90, "both inputs")
        # The journal records a job's outputs once its original is archived: wait for both.
        wait_for(lambda: sum(bool(r["outputs"]) for r in site.rows()) == 2, 90, "both journal rows")
        sizes = {}
        for stem in ("item", "item-2"):
            with (
                Image.open(site.outbox / f"{stem}.png") as cutout,
                Image.open(site.outbox / f"{stem}.mask.png") as mask,
            ):
                assert cutout.size == mask.size
                sizes[stem] = cutout.size
        assert sorted(sizes.values()) == [(451, 300), (600, 400)]
        owner_of = {row["path"]: json.loads(str(row["outputs"])) for row in site.rows()}
        # A re-upload of the cat replaces its own outputs, whichever number they got.
        cat_stem = next(s for s, size in sizes.items() if size == (451, 300))
        cat_outputs = owner_of["item.jpg"]
        assert cat_outputs[0].endswith(f"/{cat_stem}.png")
        corpus.write(site.inbox, "item.jpg", corpus.jpeg(photos["chelsea"][:200]))
        wait_for(lambda: len(site.files(site.done)) == 3, 90, "the re-upload")
        with Image.open(site.outbox / f"{cat_stem}.png") as cutout:
            assert cutout.size == (451, 200)
        assert sorted(site.files(site.outbox)) == sorted(
            f"{s}{ext}" for s in sizes for ext in (".png", ".mask.png")
        )
    finally:
        assert stop(daemon) == 0


@pytest.mark.parametrize("policy", ["replace", "error"])
def test_collision_policies(site: Site, photos: dict[str, np.ndarray], policy: str) -> None:
    site.write_config(settle_ms=100)
    config = yaml.safe_load(site.config.read_text())
    config["inboxes"][0]["collisions"] = policy
    site.config.write_text(yaml.safe_dump(config))
    corpus.write(site.inbox, "x_y.jpg", corpus.jpeg(photos["chelsea"]))
    log = site.root / "log"
    daemon = start(site.config, log=log)
    try:
        wait_for(lambda: site.files(site.done) == ["x_y.jpg"], 90, "the first input")
        corpus.write(site.inbox, "x\ny.jpg", corpus.jpeg(photos["coffee"]))
        wait_for(lambda: len(site.files(site.done) + site.files(site.errors)) >= 3
                 if policy == "error" else len(site.files(site.done)) == 2,
                 90, "the second input")  # fmt: skip
    finally:
        assert stop(daemon) == 0
    with Image.open(site.outbox / "x_y.png") as cutout:
        size = cutout.size
    if policy == "replace":
        assert size == (600, 400)  # the newer input's
    else:
        assert size == (451, 300)
        report = json.loads((site.errors / "x\ny.jpg.error.json").read_text())
        assert report["reason"] == "name_collision"
        assert report["file"] == "x\\x0ay.jpg"


def test_outputs_never_escape_the_roots_through_symbolic_links(
    site: Site, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    site.write_config(settle_ms=100)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for root in (site.outbox, site.done, site.errors):
        root.mkdir(parents=True, exist_ok=True)
    (site.outbox / "evil").symlink_to(elsewhere)
    (site.done / "sly").symlink_to(elsewhere)
    (site.errors / "bad").symlink_to(elsewhere)
    image = photo_jpegs(photos, 1)[0]
    corpus.write(site.inbox, "evil/photo.jpg", image)
    corpus.write(site.inbox, "sly/photo.jpg", image)
    corpus.write(site.inbox, "bad/notes.jpg", b"not a photo\n")
    corpus.write(site.inbox, "fine.jpg", image)
    log = site.root / "log"
    daemon = start(site.config, log=log)
    try:
        wait_for(lambda: finished(site, 4), 90, "every file")
        assert daemon.poll() is None
        # The refused file registered no name for good: once the link is gone, another input
        # gets that plain name.
        (site.outbox / "evil").unlink()
        corpus.write(site.inbox, "evil/photo.png", image)
        wait_for(lambda: finished(site, 5), 90, "a file after the link is gone")
        assert (site.outbox / "evil/photo.png").is_file()
    finally:
        assert stop(daemon) == 0
    assert list(elsewhere.iterdir()) == []
    reasons = {r["path"]: r["reason"] for r in site.rows()}
    assert reasons == {"evil/photo.jpg": "unsafe_path", "sly/photo.jpg": None,
                       "bad/notes.jpg": "unsupported_format", "fine.jpg": None,
                       "evil/photo.png": None}  # fmt: skip
    # errors/bad and done/sly are links: what was bound for them goes to the top instead.
    assert (site.errors / "notes.jpg").is_file()
    assert (site.errors / "notes.jpg.error.json").is_file()
    assert (site.errors / "evil/photo.jpg").is_file()
    assert (site.done / "photo.jpg").is_file()
    assert (site.outbox / "sly/photo.png").is_file()
    assert "symbolic link" in log.read_text()


def test_modes_follow_the_config_not_the_umask(site: Site, photos: dict[str, np.ndarray]) -> None:
    site.write_config(settle_ms=100)
    config = yaml.safe_load(site.config.read_text())
    config["inboxes"][0].update(file_mode="0640", dir_mode="0750", group=os.getgid())
    site.config.write_text(yaml.safe_dump(config))
    image = photo_jpegs(photos, 1)[0]
    corpus.write(site.inbox, "sub/photo.jpg", image)
    corpus.write(site.inbox, "sub/notes.jpg", b"not a photo\n")
    log = site.root / "log"
    daemon = start(site.config, log=log, umask=0o077)
    try:
        wait_for(lambda: len(site.files(site.done)) == 1 and len(site.files(site.errors)) == 2,
                 90, "both files")  # fmt: skip
    finally:
        assert stop(daemon) == 0
    for folder in (site.outbox, site.done, site.errors):
        assert (folder / "sub").stat().st_mode & 0o777 == 0o750
        assert folder.stat().st_mode & 0o777 == 0o750  # created by the daemon too
    for file in ("sub/photo.png", "sub/photo.mask.png"):
        info = (site.outbox / file).stat()
        assert (info.st_mode & 0o777, info.st_gid) == (0o640, os.getgid())
    assert (site.errors / "sub/notes.jpg.error.json").stat().st_mode & 0o777 == 0o640


def leftover_job(site: Site, owner: str, job: str, record: object, source: bytes | None) -> Path:
    folder = site.inbox / ".hotfolder" / "work" / owner / job
    folder.mkdir(parents=True)
    if source is not None:
        (folder / "source").write_bytes(source)
    text = record if isinstance(record, str) else json.dumps(record)
    (folder / "job.json").write_text(text)
    return folder


def test_recovery_finishes_or_files_every_leftover_job_and_serves_on(
    site: Site, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """Jobs left by a daemon that died, each of a kind that used to stop the next start."""
    site.write_config(settle_ms=100)
    image = photo_jpegs(photos, 1)[0]
    owner = dead_owner()
    long_name = "h" * 251 + ".jpg"
    corpus.write(site.done, long_name, b"an earlier upload of the same name")

    def record(job: str, rel: str, **more: object) -> dict[str, object]:
        times = {"detected_at": 1.0, "claimed_at": 2.0}
        return {"job_id": job, "inbox": "products", "relative": rel, "size": 1, **times,
                "attempts": 1, "outcome": "", **more}  # fmt: skip

    latin1 = os.fsdecode(b"caf\xe9.jpg")
    leftover_job(site, owner, "a" * 32, record("a" * 32, latin1), image)
    leftover_job(site, owner, "b" * 32, record("b" * 32, long_name), image)
    leftover_job(site, owner, "c" * 32, record("c" * 32, "done.jpg", outcome="success"), image)
    leftover_job(site, owner, "d" * 32, {"job_id": 5, "what": "no"}, image)  # wrong shape
    leftover_job(site, owner, "e" * 32, record("e" * 32, "../../escape.jpg"), image)
    leftover_job(site, owner, "f" * 32, "[1, 2", image)  # not JSON
    leftover_job(site, owner, "0" * 32, record("0" * 32, "gone.jpg", size="x"), None)
    log = site.root / "log"
    daemon = start(site.config, log=log)
    try:
        wait_serving(log)
        corpus.write(site.inbox, "after.jpg", image)
        wait_for(lambda: (site.done / "after.jpg").exists(), 90, "a file dropped after start")
        wait_for(lambda: not site.visible_inbox_files() and finished(site, 7), 90, "every job")
        assert daemon.poll() is None
    finally:
        assert stop(daemon) == 0
    done = site.files(site.done)
    assert latin1 in done
    assert "done.jpg" in done
    assert long_name in done  # the earlier upload, kept
    assert any(name.startswith("h" * 200) and name != long_name for name in done)
    # Records that cannot be trusted: their files went back to the inbox and were processed
    # as new files, under names that say where they came from.
    recovered = [name for name in done if name.startswith("recovered-")]
    assert len(recovered) == 3
    assert not (site.root.parent / "escape.jpg").exists()
    assert not (site.root / "escape.jpg").exists()
    shutil.rmtree(site.inbox / ".hotfolder", ignore_errors=True)


def deep_folder(root: Path, levels: int) -> Path:
    """A folder ``levels`` deep, each name 250 bytes: its path is longer than PATH_MAX (4096),
    so only descriptor-relative calls can reach it. Returns its path (unusable as a string)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    path = root
    for level in range(levels):
        name = f"d{level:02d}" + "x" * 247
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd, path = child, path / name
    descriptor = os.open("photo.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(descriptor, b"not reachable by path anyway")
    os.close(descriptor)
    os.close(fd)
    return path


def test_odd_layouts_and_names_found_by_attack_end_right(
    site: Site, photos: dict[str, np.ndarray]
) -> None:
    """Cases a tester found by attacking the daemon: each used to stop it (some at every
    start), lose a file, or misfile one."""
    site.write_config(settle_ms=100)
    config = yaml.safe_load(site.config.read_text())
    config["inboxes"][0]["outputs"] = [{"kind": "cutout", "name": "{stem}{ext}.png"},
                                       {"kind": "mask"}]  # fmt: skip
    site.config.write_text(yaml.safe_dump(config))
    photo, bad = photo_jpegs(photos, 1)[0], b"not a photo\n"
    long_ext = os.fsdecode(b"a." + b"k" * 253)  # 255 bytes, "extension" of 253
    log = site.root / "log"
    site.inbox.mkdir(parents=True)
    deep_folder(site.inbox, 17)  # a path past PATH_MAX: scans must step over it
    locked = site.inbox / "locked"
    locked.mkdir()
    (locked / "inside.jpg").write_bytes(photo)
    locked.chmod(0o444)  # listable, not searchable
    daemon = start(site.config, log=log, prefix=without_root_powers())
    sock = socket.socket(socket.AF_UNIX)

    def bind_socket() -> None:
        sock.bind(str(site.inbox / "sock.jpg"))

    def folder_at_output() -> None:
        (site.outbox / "x.mask.png").unlink()
        (site.outbox / "x.mask.png").mkdir()

    steps: list[tuple[str, bytes, str, Callable[[], None]]] = [
        (long_ext, photo, PUBLISHED, lambda: None),
        (long_ext, photo, PUBLISHED, lambda: None),  # again: its archive name gets a job tag
        ("a.jpg.error.json", bad, "unsupported_format", lambda: None),
        ("a.jpg", bad, "unsupported_format", lambda: None),  # must not replace the one above
        ("c.kkk", bad, "unsupported_format", lambda: None),
        ("c.kkk", bad, "unsupported_format", lambda: None),
        ("sock.jpg", b"", "not_a_file", bind_socket),
        ("x.jpg", photo, PUBLISHED, lambda: None),  # outputs xjpg.png and x.mask.png
        ("x.jpg", photo, "name_collision", folder_at_output),  # its own name, now a folder
        ("xjpg.png/z.jpg", photo, "name_collision", lambda: None),  # a file where a folder goes
    ]
    try:
        wait_serving(log)
        for index, (name, data, expect, before) in enumerate(steps):
            before()
            if data:
                corpus.write(site.inbox, name, data)
            after = f"good-{index:02d}.jpg"
            corpus.write(site.inbox, after, photo)
            shown = names.escape(name)
            count = sum(1 for step in steps[: index + 1] if step[0] == name)

            def ended(shown: str = shown, after: str = after, count: int = count) -> bool:
                seen = outcomes(site)
                return len(seen.get(shown, [])) == count and after in seen

            wait_for(ended, 60, f"{shown} and the good file after it")
            assert daemon.poll() is None, f"the daemon exited after {shown}"
            assert outcomes(site)[shown][-1] == expect, shown
        sock.close()
    finally:
        assert stop(daemon) == 0
        locked.chmod(0o755)
    errors = site.files(site.errors)
    assert "a.jpg.error.json" in errors  # the first upload, a file of that very name
    reports = []
    for file in errors:
        with contextlib.suppress(ValueError):  # the first upload is "not a photo", not JSON
            reports.append(json.loads((site.errors / file).read_text()))
    assert sorted(r["file"] for r in reports) == sorted(
        ["a.jpg.error.json", "a.jpg", "c.kkk", "c.kkk", "sock.jpg", "x.jpg", "xjpg.png/z.jpg"]
    )
    done = [os.fsencode(f) for f in site.files(site.done)]
    assert sum(1 for f in done if f.startswith(b"a.kkk")) == 2
    assert all(len(f) <= 255 for f in done)
    assert "locked" in log.read_text()  # said once, and served on
