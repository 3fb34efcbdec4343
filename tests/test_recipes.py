"""Rendering outputs: the fast paths give what the plain NumPy definitions give."""

from __future__ import annotations

import numpy as np
import pytest

from hotfolder import recipes


@pytest.fixture
def alpha(photos: dict[str, np.ndarray]) -> np.ndarray:
    """Every alpha level, with large fully transparent and fully opaque areas."""
    shape = photos["coffee"].shape[:2]
    levels = np.random.default_rng(7).integers(0, 256, shape, dtype=np.uint8)
    levels[:100] = 0
    levels[-100:] = 255
    return levels


@pytest.mark.parametrize("clear", [True, False])
def test_cutout_is_the_photo_with_its_alpha(
    photos: dict[str, np.ndarray], alpha: np.ndarray, clear: bool
) -> None:
    rgb = photos["coffee"]
    expected = np.dstack((rgb, alpha))
    if clear:
        expected[alpha == 0] = 0
    got = recipes.cutout(rgb, alpha, clear)
    assert got.dtype == np.uint8
    assert np.array_equal(got, expected)


def test_composite_blends_onto_the_colour(photos: dict[str, np.ndarray], alpha: np.ndarray) -> None:
    rgb = photos["coffee"]
    colour = (10, 200, 255)
    weight = alpha.astype(np.float64)[:, :, None] / 255
    expected = rgb * weight + np.asarray(colour) * (1 - weight)
    got = recipes.composite(rgb, alpha, colour)
    assert got.shape == rgb.shape
    assert np.abs(got - expected).max() <= 0.51  # rounded to a level, from float32 weights
    assert np.array_equal(got[alpha == 255], rgb[alpha == 255])
    assert (got[alpha == 0] == colour).all()
