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


def estimated_colours(photo: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The colours a cutout stores (what a composite blends), as the photo's (H, W, 3) uint8."""
    picture = imaging.Picture(rgb=photo, alpha=None)
    data = recipes.render(recipes.Output(recipes.Kind.CUTOUT), picture, alpha)
    return np.asarray(Image.open(io.BytesIO(data)))[:, :, :3]


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
    kept = alpha > 245  # near-opaque and opaque pixels are left as they are
    assert np.array_equal(estimated_colours(photo, alpha)[kept], photo[kept])


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


@pytest.mark.parametrize("name", ["green", "blue", "red"])
def test_with_the_real_matte(engine: MattingEngine, name: str) -> None:
    """Through the model's own matte, the one users get, whose edge is not the drawn one:
    u2netp's soft band lies partly on pure backdrop (and it calls opaque part of the true soft
    edge), so the photo there is backdrop, which the estimate must not take for the subject."""
    backdrop = BACKDROPS[name]
    photo, _ = soft_disc(backdrop)
    alpha = engine.predict([photo])[0]
    assert band_excess(photo, alpha, backdrop, decontaminate=False) > 40  # the rim to remove
    assert abs(band_excess(photo, alpha, backdrop)) <= 5
    kept = alpha > 245
    assert np.array_equal(estimated_colours(photo, alpha)[kept], photo[kept])


def test_a_soft_part_of_another_colour_keeps_it() -> None:
    """A tuft of olive hair, 90 % opaque, above an orange face, on a dark-green backdrop: the
    hair is nearer the backdrop's colour than the face is, but it is no mix of the two, so the
    estimate must not take it for backdrop and paint it the face's colour."""
    face, hair, backdrop = (np.array(c, np.float64) for c in
                            ((214, 132, 74), (122, 128, 55), (57, 101, 68)))  # fmt: skip
    yy, xx = np.mgrid[:400, :400]
    alpha = np.clip((100 - np.hypot(yy - 260, xx - 200)) / 8 + 0.5, 0, 1)
    tuft = (yy >= 130) & (yy < 170) & (xx >= 170) & (xx < 230) & (alpha < 1)
    alpha[tuft] = 0.9
    colour = np.where(tuft[:, :, None], hair, face)
    photo = alpha[:, :, None] * colour + (1 - alpha[:, :, None]) * backdrop
    photo, alpha8 = np.round(photo).astype(np.uint8), np.round(alpha * 255).astype(np.uint8)
    estimated = estimated_colours(photo, alpha8)[tuft].astype(np.float64)
    assert np.abs(estimated - hair).mean() < 10
