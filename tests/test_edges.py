"""Soft edges keep the subject's colour: the backdrop does not bleed into cutouts and
composites (foreground colour estimation)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from hotfolder import imaging, recipes
from hotfolder.engine import MattingEngine

SUBJECT = np.array([235, 228, 215], np.float64)  # a light product: cream porcelain
BACKDROPS = {"green": (40, 170, 60), "blue": (40, 70, 200), "red": (200, 40, 45),
             "magenta": (190, 40, 180), "grey": (110, 110, 110)}  # fmt: skip
BAND = (10, 245)  # the semi-transparent band, as alpha levels


def soft_disc(backdrop: tuple[int, int, int], size: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """A light disc with a 24-pixel soft edge on a plain backdrop: (photo, true alpha)."""
    yy, xx = np.mgrid[:size, :size]
    distance = np.hypot(yy - size / 2, xx - size / 2)
    alpha = np.clip((size * 0.3 - distance) / 24 + 0.5, 0, 1)
    photo = alpha[:, :, None] * SUBJECT + (1 - alpha[:, :, None]) * np.asarray(backdrop)
    return np.round(photo).astype(np.uint8), np.round(alpha * 255).astype(np.uint8)


def excess(pixels: np.ndarray, backdrop: tuple[int, int, int]) -> np.ndarray:
    """How much of the backdrop's hue each pixel shows: its chroma along the backdrop's, scaled
    so that for pure green it is G − (R + B)/2. Zero for a neutral backdrop."""
    chroma = np.asarray(backdrop, np.float64) - np.mean(backdrop)
    if not np.any(chroma):
        direction = np.zeros(3)
    else:
        direction = chroma / np.linalg.norm(chroma) * np.sqrt(1.5)
    values = pixels.astype(np.float64)
    return (values - values.mean(axis=-1, keepdims=True)) @ direction


def composite_on_white(photo: np.ndarray, alpha: np.ndarray, decontaminate: bool) -> np.ndarray:
    output = recipes.parse_output({"kind": "composite", "format": "png",
                                   "decontaminate": decontaminate}, "o")  # fmt: skip
    picture = imaging.Picture(rgb=photo, alpha=None)
    data = recipes.render(output, picture, alpha)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def band_excess(photo: np.ndarray, alpha: np.ndarray, backdrop: tuple[int, int, int],
                decontaminate: bool = True) -> float:  # fmt: skip
    """Mean backdrop excess over the band, beyond the subject's own hue (a cream subject is a
    little red by itself): composite minus the subject alone blended onto white."""
    band = (alpha >= BAND[0]) & (alpha <= BAND[1])
    flat = composite_on_white(photo, alpha, decontaminate)
    weight = alpha[band, None] / 255.0
    ideal = weight * SUBJECT + (1 - weight) * 255
    return float((excess(flat[band], backdrop) - excess(ideal, backdrop)).mean())


def test_green_bleeds_without_estimation() -> None:
    """The fault as users see it, and the metric's scale: a clear green rim."""
    photo, alpha = soft_disc(BACKDROPS["green"])
    assert band_excess(photo, alpha, BACKDROPS["green"], decontaminate=False) > 20


@pytest.mark.parametrize("name", list(BACKDROPS))
def test_no_backdrop_colour_in_the_soft_edge(name: str) -> None:
    backdrop = BACKDROPS[name]
    photo, alpha = soft_disc(backdrop)
    assert abs(band_excess(photo, alpha, backdrop)) <= 5
    inside = composite_on_white(photo, alpha, True)[alpha == 255]
    assert np.array_equal(inside, photo[alpha == 255])  # opaque pixels are left as they are


def test_cutout_edges_carry_the_subject_colour() -> None:
    photo, alpha = soft_disc(BACKDROPS["green"])
    picture = imaging.Picture(rgb=photo, alpha=None)
    data = recipes.render(recipes.Output(recipes.Kind.CUTOUT), picture, alpha)
    rgba = np.asarray(Image.open(io.BytesIO(data)))
    band = (alpha >= BAND[0]) & (alpha <= BAND[1])
    weight = alpha[band, None] / 255.0  # as a viewer shows it on white
    seen = weight * rgba[band][:, :3] + (1 - weight) * 255
    ideal = weight * SUBJECT + (1 - weight) * 255
    bleed = excess(seen, BACKDROPS["green"]) - excess(ideal, BACKDROPS["green"])
    assert abs(bleed.mean()) <= 5


def test_with_the_real_matte(engine: MattingEngine) -> None:
    """Through the model's own matte, whose edge is not the drawn one (u2netp's is wider than
    the true edge, so pixels that are nearly all backdrop are in its band): the estimate can
    only remove part of the bleed then, but it always removes a clear part of it."""
    backdrop = BACKDROPS["green"]
    photo, _ = soft_disc(backdrop)
    alpha = engine.predict([photo])[0]
    before = band_excess(photo, alpha, backdrop, decontaminate=False)
    assert band_excess(photo, alpha, backdrop) < before - 8
