"""Foreground colour estimation ("decontamination") in the soft edge of a matte.

A pixel at the edge of a product is a mix of the product and the backdrop: ``I = αF + (1 − α)B``.
Using ``I`` as the colour of a cutout (or blending ``I`` onto white) keeps the backdrop's share,
``(1 − α)B``: a green rim from a green studio backdrop, a grey halo on a white page. The colour to
use is ``F``, estimated here by blur fusion: Forte & Pitié, "Approximate Fast Foreground Colour
Estimation", ICIP 2021 — the local means of foreground and background, each weighted by how
much of it a pixel holds, then ``F = F̂ + α(I − αF̂ − (1 − α)B̂)``; once at a large radius, then
again at smaller ones from the previous estimate. It is the estimator rembg and pymatting ship, in
box blurs, whose cost does not depend on the radius.

Only pixels with 0 < α < 255 change, and only the part of the picture around them is computed.
"""

from __future__ import annotations

import cv2
import numpy as np

# The blur-fusion passes: box size in pixels, and the scale each is computed at. The paper's
# authors use boxes of 90 then 6; a middle pass at 30 lowers the backdrop left in a 24-pixel soft
# edge by about a quarter (tests/test_edges.py). The large boxes' means are smooth, so their passes
# run on the picture shrunk 4 and 2 times: a third of the CPU time, for the same result within a
# level where it is used (the last pass, at full size, is what gives fine detail such as hair).
PASSES = ((90, 4), (30, 2), (6, 1))
EPSILON = np.float32(1e-5)
TILE = 64  # pixels; the full-size pass runs only on tiles the soft edge crosses


def estimate(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8 with the colour of every semi-transparent pixel (0 < ``alpha``
    (H, W) uint8 < 255) replaced by its estimated foreground colour; a new array when any pixel
    changes, ``rgb`` itself when none does."""
    band = cv2.inRange(alpha, 1, 254)
    x, y, width, height = cv2.boundingRect(band)
    if width == 0:
        return rgb
    margin = PASSES[0][0]
    rows = slice(max(0, y - margin), min(rgb.shape[0], y + height + margin))
    cols = slice(max(0, x - margin), min(rgb.shape[1], x + width + margin))
    image = rgb[rows, cols].astype(np.float32) * np.float32(1 / 255)
    weight = alpha[rows, cols].astype(np.float32) * np.float32(1 / 255)
    result = rgb.copy()
    _blur_fusion(image, weight, band[rows, cols], result[rows, cols])
    return result


def _blur_fusion(image: np.ndarray, alpha: np.ndarray, band: np.ndarray, out: np.ndarray) -> None:
    """Writes into ``out`` (H, W, 3) uint8, where ``band`` (H, W) uint8 is set, the foreground
    of ``image`` (H, W, 3) float32 in 0–1 under ``alpha`` (H, W) float32 in 0–1, through every
    pass of PASSES. Each pass's inputs are resized from the previous pass's results: the
    picture is shrunk once per scale, and the estimates are only ever enlarged. The last pass,
    at full size, is computed only in the tiles the band crosses."""
    height, width = alpha.shape
    *coarse, (last_size, _) = PASSES
    foreground, background = _coarse_passes(image, alpha, coarse)
    foreground = _enlarged(foreground, (width, height))
    background = _enlarged(background, (width, height))
    margin = last_size
    for top in range(0, height, TILE):
        for left in range(0, width, TILE):
            inner = (slice(top, min(height, top + TILE)), slice(left, min(width, left + TILE)))
            if not band[inner].any():
                continue
            rows = slice(max(0, top - margin), min(height, top + TILE + margin))
            cols = slice(max(0, left - margin), min(width, left + TILE + margin))
            tile = (rows, cols)
            estimated, _ = _fuse(image[tile], foreground[tile], background[tile], alpha[tile],
                                 last_size)  # fmt: skip
            within = (slice(top - rows.start, inner[0].stop - rows.start),
                      slice(left - cols.start, inner[1].stop - cols.start))  # fmt: skip
            pixels = (estimated[within] * 255 + 0.5).astype(np.uint8)
            np.copyto(out[inner], pixels, where=band[inner][:, :, None].astype(bool))


def _coarse_passes(
    image: np.ndarray, alpha: np.ndarray, passes: list[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, local background means) after the shrunk passes, at the last one's scale."""
    height, width = alpha.shape
    foreground = background = None
    for index, (size, scale) in enumerate(passes):
        shape = (max(1, width // scale), max(1, height // scale))
        if scale == 1 or min(shape) < size // scale:
            shape, scale = (width, height), 1
        picture, weight = _shrunk(image, shape), _shrunk(alpha, shape)
        foreground = picture if foreground is None else _enlarged(foreground, shape)
        background = picture if background is None else _enlarged(background, shape)
        foreground, local_background = _fuse(picture, foreground, background, weight,
                                              max(1, size // scale))  # fmt: skip
        if index == 0:  # the first pass's local background means serve every pass
            background = local_background
    assert foreground is not None
    assert background is not None
    return foreground, background


def _shrunk(pixels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if (pixels.shape[1], pixels.shape[0]) == shape:
        return pixels
    return cv2.resize(pixels, shape, interpolation=cv2.INTER_AREA)


def _enlarged(pixels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if (pixels.shape[1], pixels.shape[0]) == shape:
        return pixels
    return cv2.resize(pixels, shape, interpolation=cv2.INTER_LINEAR)


def _fuse(
    image: np.ndarray, foreground: np.ndarray, background: np.ndarray, alpha: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One blur-fusion pass on float32 pixels in 0–1: (foreground, local background means).
    ``F = F̂ + α(I − B̂ − α(F̂ − B̂))``, the paper's formula rearranged to reuse buffers."""
    box = (size, size)
    a = alpha[:, :, None]
    blurred_alpha = cv2.blur(alpha, box)[:, :, None]
    mean_foreground = cv2.blur(foreground * a, box)
    mean_foreground /= blurred_alpha + EPSILON
    mean_background = cv2.blur(background * (1 - a), box)
    mean_background /= (1 - blurred_alpha) + EPSILON
    difference = mean_foreground - mean_background
    difference *= a
    estimated = image - mean_background
    estimated -= difference
    estimated *= a
    estimated += mean_foreground
    np.clip(estimated, 0, 1, out=estimated)
    return estimated, mean_background
