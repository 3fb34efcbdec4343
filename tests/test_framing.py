"""Outputs ready to list: cropped to the subject, or centred on a fixed canvas; WebP; a size
limit met by lowering the quality."""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from hotfolder import framing, imaging, journal, recipes
from hotfolder.jobs import ImageError, Reason

from . import corpus
from .daemon import Site, run_once


def scene(
    box: tuple[int, int, int, int], size: tuple[int, int] = (900, 600)
) -> tuple[imaging.Picture, np.ndarray]:
    """A photo (H, W, 3) with noise (so JPEG sizes depend on quality) and a soft-edged
    rectangular subject at ``box`` (x, y, width, height); its matte (H, W)."""
    width, height = size
    rng = np.random.default_rng(3)
    photo = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    alpha = np.zeros((height, width), np.uint8)
    x, y, w, h = box
    alpha[y : y + h, x : x + w] = 255
    alpha = cv2.GaussianBlur(alpha, (0, 0), 3)
    return imaging.Picture(rgb=photo, alpha=None), alpha


def measured_box(alpha: np.ndarray) -> tuple[int, int, int, int]:
    return cv2.boundingRect(cv2.inRange(alpha, framing.SUBJECT_ALPHA, 255))


def output(**keys: object) -> recipes.Output:
    return recipes.parse_output({"kind": "cutout", **keys}, "o")


@pytest.mark.parametrize(
    ("box", "canvas", "padding"),
    [((100, 50, 300, 500), (1600, 1600), 0.075),  # tall product, square shop image
     ((20, 200, 860, 180), (1200, 800), 0.05),  # wide product on a landscape canvas
     ((700, 400, 150, 120), (1000, 1000), 0.1),  # small, off-centre, touching no border
     ((0, 0, 120, 90), (1600, 1600), 0.0)],  # tiny: enlarged at most MAX_UPSCALE
)  # fmt: skip
def test_canvas_centres_and_fits_the_subject(
    box: tuple[int, int, int, int], canvas: tuple[int, int], padding: float
) -> None:
    picture, alpha = scene(box)
    data = recipes.render(output(canvas=list(canvas), padding=padding), picture, alpha)
    written = np.asarray(Image.open(io.BytesIO(data)))
    assert written.shape[1::-1] == canvas
    x, y, w, h = measured_box(written[:, :, 3])
    assert abs((x + w / 2) - canvas[0] / 2) <= 2
    assert abs((y + h / 2) - canvas[1] / 2) <= 2
    _, _, sw, sh = measured_box(alpha)
    fit = min((canvas[0] - 2 * round(padding * canvas[0])) / sw,
              (canvas[1] - 2 * round(padding * canvas[1])) / sh)  # fmt: skip
    scale = min(fit, framing.MAX_UPSCALE)
    if fit <= framing.MAX_UPSCALE:  # the longer side (relative to the room) fills the room
        room = (
            canvas[0] - 2 * round(padding * canvas[0]),
            canvas[1] - 2 * round(padding * canvas[1]),
        )
        assert abs(w - room[0]) <= 2 or abs(h - room[1]) <= 2
    assert abs(w - sw * scale) <= 2
    assert abs(h - sh * scale) <= 2


def test_composite_canvas_is_the_colour_all_round() -> None:
    picture, alpha = scene((300, 100, 200, 300))
    keys = {"kind": "composite", "format": "jpg", "canvas": [800, 800], "padding": 0.08,
            "background": "white"}  # fmt: skip
    data = recipes.render(recipes.parse_output(keys, "o"), picture, alpha)
    written = np.asarray(Image.open(io.BytesIO(data)))
    assert written.shape == (800, 800, 3)
    assert (written[:40] >= 250).all()
    assert (written[:, :40] >= 250).all()


def test_crop_is_the_subject_box_with_padding() -> None:
    picture, alpha = scene((200, 100, 300, 200))
    _, _, sw, sh = measured_box(alpha)
    data = recipes.render(output(crop=True, padding=0.1), picture, alpha)
    written = Image.open(io.BytesIO(data))
    margin = round(0.1 * max(sw, sh))
    assert written.size == (sw + 2 * margin, sh + 2 * margin)


def test_an_empty_matte_is_refused_not_framed() -> None:
    picture, _ = scene((0, 0, 1, 1))
    empty = np.zeros(picture.rgb.shape[:2], np.uint8)
    for framed in (output(canvas=[500, 500]), output(crop=True)):
        with pytest.raises(ImageError) as refused:
            recipes.render(framed, picture, empty)
        assert refused.value.reason == Reason.NO_SUBJECT


@pytest.mark.parametrize("lossless", [False, True])
def test_webp_outputs_keep_transparency(lossless: bool) -> None:
    picture, alpha = scene((200, 100, 300, 200))
    data = recipes.render(output(format="webp", lossless=lossless), picture, alpha)
    written = Image.open(io.BytesIO(data))
    assert written.format == "WEBP"
    pixels = np.asarray(written)
    assert pixels.shape[2] == 4
    assert np.abs(pixels[:, :, 3].astype(int) - alpha).max() <= (0 if lossless else 8)


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_max_bytes_lowers_the_quality_until_the_file_fits(fmt: str) -> None:
    picture, alpha = scene((200, 100, 300, 200))
    keys = {"kind": "composite", "format": fmt, "quality": 95}
    full = recipes.render(recipes.parse_output(keys, "o"), picture, alpha)
    limit = len(full) // 3
    lowered: dict[str, int] = {}
    limited = recipes.parse_output({**keys, "max_bytes": limit}, "o")
    data = recipes.render_all((limited,), picture, alpha, lowered)[0]
    assert len(data) <= limit
    assert 1 <= lowered[limited.name] < 95
    with pytest.raises(ImageError) as refused:
        recipes.render(recipes.parse_output({**keys, "max_bytes": 1024}, "o"), picture, alpha)
    assert refused.value.reason == Reason.TOO_BIG_OUTPUT


def test_recipe_errors_name_the_key() -> None:
    wrong = [({"canvas": [0, 10]}, "canvas"), ({"padding": 0.5}, "padding"),
             ({"max_bytes": 5000}, "max_bytes"), ({"lossless": True}, "lossless")]  # fmt: skip
    for keys, message in wrong:
        with pytest.raises(recipes.RecipeError, match=message):
            output(**keys)


def test_daemon_sends_an_empty_matte_to_errors(site: Site, photos: dict[str, np.ndarray]) -> None:
    """A photo whose pixels are all transparent leaves nothing to frame: errors/, with the
    reason, while a real photo beside it is framed and fits its size limit."""
    square = {"kind": "composite", "canvas": [400, 400], "padding": 0.05, "max_bytes": 6000}
    site.write_config(inbox={"outputs": [square]})
    corpus.write(site.inbox, "cup.jpg", corpus.jpeg(photos["coffee"]))
    corpus.write(site.inbox, "nothing.png", corpus.png(np.zeros((300, 300, 4), np.uint8)))
    assert run_once(site.config, site.root / "log") == 1
    assert site.files(site.done) == ["cup.jpg"]
    with Image.open(site.outbox / "cup.jpg") as written:
        assert written.size == (400, 400)
    assert (site.outbox / "cup.jpg").stat().st_size <= 6000
    report = json.loads((site.errors / "nothing.png.error.json").read_text())
    assert report["reason"] == "no_subject"
    (cup,) = [row for row in site.rows() if row["outcome"] == "success"]
    quality = json.loads(str(cup["notes"]))["quality"]["{stem}.jpg"]
    assert 1 <= quality < 92


def test_a_journal_from_before_notes_gains_the_column(tmp_path: Path) -> None:
    """A daemon upgraded over its old journal records lowered qualities instead of failing."""
    path = tmp_path / "journal.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(journal.SCHEMA.replace(",\n    notes TEXT", ""))
        assert "notes" not in {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    upgraded = journal.Journal(path)
    upgraded.begin("job1", inbox="products", path="cup.jpg", outcome="claimed")
    upgraded.update("job1", outcome="success", notes={"quality": {"{stem}.jpg": 71}})
    upgraded.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        (notes,) = db.execute("SELECT notes FROM jobs WHERE id = 'job1'").fetchone()
    assert json.loads(notes) == {"quality": {"{stem}.jpg": 71}}


def test_a_picture_too_wide_for_jpeg_fails_alone(site: Site, photos: dict[str, np.ndarray]) -> None:
    """JPEG holds at most 65 500 pixels a side: a panorama strip wider than that (well within
    the pixel limit) goes to errors/ with the reason, and the daemon serves the next photo."""
    site.write_config(inbox={"outputs": [{"kind": "composite"}]})
    corpus.write(site.inbox, "strip.png", corpus.png(np.full((2, 66_000, 3), 200, np.uint8)))
    corpus.write(site.inbox, "cup.jpg", corpus.jpeg(photos["coffee"]))
    assert run_once(site.config, site.root / "log") == 1
    assert site.files(site.done) == ["cup.jpg"]
    report = json.loads((site.errors / "strip.png.error.json").read_text())
    assert report["reason"] == "encode_failed"
    assert "65500" in report["message"]


def test_a_faint_haze_over_the_photo_is_not_enlarged_beyond_the_canvas() -> None:
    """A small product on a 6 MP photo whose matte keeps a faint haze (alpha 1) everywhere is
    enlarged 4× for the canvas: only the part that lands on the canvas is scaled, not the
    whole photo (96 MP, over a gigabyte of intermediate pixels)."""
    picture, alpha = scene((1450, 950, 100, 100), size=(3000, 2000))
    alpha = np.maximum(alpha, 1)
    tracemalloc.start()
    try:
        rgb, framed = framing.on_canvas(picture.rgb, alpha, (1000, 1000), 0.0, (255, 255, 255))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20
    assert measured_box(framed) == pytest.approx((300, 300, 400, 400), abs=2)
    assert rgb.shape == (1000, 1000, 3)


def test_a_webp_canvas_must_fit_webp() -> None:
    """WebP holds at most 16 383 pixels a side: a larger canvas is refused with the config,
    not on every photo."""
    with pytest.raises(recipes.RecipeError, match=r"canvas.*16383"):
        output(format="webp", canvas=[20_000, 1000])
    assert output(format="webp", canvas=[16_383, 1000]).canvas == (16_383, 1000)
