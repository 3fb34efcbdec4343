"""Lanczos resizing: Pillow's results at any size, and memory that does not grow with sizes."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from hotfolder.resample import WEIGHTS_CACHE_BYTES, lanczos_weights, resize_lanczos

MiB = 2**20


@pytest.mark.parametrize(
    ("width", "height"),
    [(100, 50), (319, 321), (5000, 3), (4000, 2), (1, 1)],  # up, near 1:1, strips, one pixel
)
def test_lanczos_resize_matches_pillow_at_any_size(width: int, height: int) -> None:
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), np.uint8)
    expected = np.asarray(Image.fromarray(pixels).resize((320, 320), Image.LANCZOS))
    got = resize_lanczos(torch.from_numpy(pixels).permute(2, 0, 1).float(), (320, 320))
    # Pillow's fixed-point arithmetic rounds a few pixels the other way.
    assert np.abs(got.permute(1, 2, 0).numpy() - expected).max() <= 1


def test_memory_held_after_many_distinct_sizes_stays_under_the_cap() -> None:
    # Forty photos, each a different size: every side needs its own 320 × 3 000-odd weights
    # (3.8 MB), 150 MB in all were they all kept.
    gc.collect()
    tracemalloc.start()
    try:
        for i in range(40):
            resize_lanczos(torch.zeros(3, 4, 3001 + 7 * i), (320, 320))
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held <= WEIGHTS_CACHE_BYTES + 4 * MiB
    assert lanczos_weights.nbytes <= WEIGHTS_CACHE_BYTES


def test_the_latest_sizes_weights_are_reused() -> None:
    kept = lanczos_weights.get(4000, 320)
    for height, width in ((3000, 4000), (4000, 3000), (3000, 4000)):  # landscape and portrait
        resize_lanczos(torch.zeros(3, height, width), (320, 320))
    # Computing is cheap but not free: a camera's two sides are kept, not computed again.
    assert lanczos_weights.get(4000, 320) is kept


def test_weights_larger_than_the_cap_are_not_kept() -> None:
    side = WEIGHTS_CACHE_BYTES // (320 * 4) + 1  # one 320-row float32 matrix over the cap
    weights = lanczos_weights.get(side, 320)
    assert weights.shape == (320, side)
    np.testing.assert_allclose(weights.sum(axis=1), 1, rtol=1e-5)
    assert lanczos_weights.nbytes <= WEIGHTS_CACHE_BYTES
    assert lanczos_weights.get(side, 320) is not weights
