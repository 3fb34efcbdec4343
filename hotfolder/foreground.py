"""Foreground colour estimation ("decontamination") in the soft edge of a matte.

A pixel at the edge of a product is a mix of the product and the backdrop: ``I = αF + (1 − α)B``.
Using ``I`` as the colour of a cutout (or blending ``I`` onto white) keeps the backdrop's share,
``(1 − α)B``: a green rim from a green studio backdrop, a grey halo on a white page. The colour to
use is ``F``, estimated here by blur fusion: Forte & Pitié, "Approximate Fast Foreground Colour
Estimation", ICIP 2021 — the local means of foreground and background, each weighted by how
much of it a pixel holds, then ``F = F̂ + α(I − αF̂ − (1 − α)B̂)``; once at a large radius, then
again at smaller ones from the previous estimate. It is the estimator rembg and pymatting ship, in
box blurs, whose cost does not depend on the radius.

The matte is the model's, and its soft band is often not where the true edge is: part of it lies
on pure backdrop, where ``I = B``, and blur fusion's correction term, ``α(I − …)``, puts that
backdrop colour back into F. So the estimate is then held to the subject's confident interior,
as retouchers' "decontaminate colours" does (Photoshop's Refine Edge; also the foreground
extension of Levin et al., "A Closed-Form Solution to Natural Image Matting", PAMI 2008, §6, and
Forte & Pitié's own weighted means): a reference colour ``F₊`` is the mean of the photo over the
opaque pixels well inside the matte, ``blur(w·I)/blur(w)``, at decreasing radii, and the part of
``F − F₊`` that points from ``F₊`` towards the local backdrop ``B̂`` is projected out. Colour away
from the backdrop's (texture, a strand of hair of another colour) stays. The interior is taken
some distance inside the opaque region because the model also calls opaque a ring of the true
soft edge; distances and radii are in the model's pixels (a 320th of the picture's longer
side), since its errors are.

Only pixels with 0 < α < 245 change: near-opaque and opaque pixels keep the photo's colour. Only
the part of the picture around them is computed.
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
OPAQUE = 245  # alpha levels from which a pixel keeps the photo's colour
# The subject's confident interior, in the model's pixels (a 320th of the picture's longer side,
# the size U²-Net sees): opaque pixels at least INTERIOR_DEPTH inside the matte's opaque region
# (u2netp calls opaque up to about 12 of them of a wide soft edge), their means over boxes of
# REFERENCE_BOXES, each smaller one trusted where it holds enough interior. Computed on the
# picture shrunk to REFERENCE_SCALE model pixels per pixel: these means are smooth.
MODEL_PIXELS = 320
INTERIOR_DEPTH = 13.0
REFERENCE_BOXES = (144, 72, 24)
REFERENCE_SCALE = 3
# Only interior within a REACH box counts as the subject's colour (a strand of hair further out
# may well be of another colour), and the projection is whole where the photo is within a third
# of |B̂ − F₊| of the backdrop, fading to none at that distance (NEARNESS).
REACH = 72
NEARNESS = np.float32(3)
TRUST = np.float32(1e-3)  # fraction of a box's area of interior at which its mean is half-trusted


def estimate(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8 with the colour of every semi-transparent pixel (0 < ``alpha``
    (H, W) uint8 < 255) replaced by its estimated foreground colour; a new array when any pixel
    changes, ``rgb`` itself when none does."""
    band = cv2.inRange(alpha, 1, OPAQUE - 1)
    x, y, width, height = cv2.boundingRect(band)
    if width == 0:
        return rgb
    margin = PASSES[0][0]
    rows = slice(max(0, y - margin), min(rgb.shape[0], y + height + margin))
    cols = slice(max(0, x - margin), min(rgb.shape[1], x + width + margin))
    image = rgb[rows, cols].astype(np.float32) * np.float32(1 / 255)
    weight = alpha[rows, cols].astype(np.float32) * np.float32(1 / 255)
    result = rgb.copy()
    model_pixel = max(rgb.shape[:2]) / MODEL_PIXELS
    _blur_fusion(image, weight, band[rows, cols], result[rows, cols], model_pixel)
    return result


def _blur_fusion(
    image: np.ndarray, alpha: np.ndarray, band: np.ndarray, out: np.ndarray, model_pixel: float
) -> None:
    """Writes into ``out`` (H, W, 3) uint8, where ``band`` (H, W) uint8 is set, the foreground
    of ``image`` (H, W, 3) float32 in 0–1 under ``alpha`` (H, W) float32 in 0–1, through every
    pass of PASSES, without the part of it that points towards the backdrop from the subject's
    interior (``model_pixel``: the size of one of the matte model's pixels, in pixels). Each
    pass's inputs are resized from the previous pass's results: the picture is shrunk once per
    scale, and the estimates are only ever enlarged. The last pass, at full size, is computed
    only in the tiles the band crosses."""
    height, width = alpha.shape
    *coarse, (last_size, _) = PASSES
    foreground, background = _coarse_passes(image, alpha, coarse)
    reference, trust = _interior_reference(image, alpha, model_pixel)
    reference = _enlarged(reference, (width, height))
    trust = _enlarged(trust, (width, height))
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
            estimated = estimated[within]
            _project_out_backdrop(estimated, image[inner], reference[inner], background[inner],
                                  trust[inner])  # fmt: skip
            pixels = (estimated * 255 + 0.5).astype(np.uint8)
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


def _interior_reference(
    image: np.ndarray, alpha: np.ndarray, model_pixel: float
) -> tuple[np.ndarray, np.ndarray]:
    """(reference colours (h, w, 3) float32, trust (h, w) float32 in 0–1), on ``image`` shrunk
    to REFERENCE_SCALE model pixels per pixel: the subject's colour as its confident interior
    shows it, and how much of that interior lies within reach of each pixel."""
    height, width = alpha.shape
    scale = max(1.0, REFERENCE_SCALE * model_pixel)
    shape = (max(1, round(width / scale)), max(1, round(height / scale)))
    picture, small = _shrunk(image, shape), _shrunk(alpha, shape)
    opaque = (small >= np.float32(254.5 / 255)).astype(np.uint8)
    depth = cv2.distanceTransform(opaque, cv2.DIST_L2, 3) * np.float32(scale / model_pixel)
    # weights rise from 0 at INTERIOR_DEPTH to 1 at twice it, so the reference moves smoothly
    weight = np.clip(depth / np.float32(INTERIOR_DEPTH) - 1, 0, 1).astype(np.float32)
    reference = picture
    trust = np.zeros_like(weight)
    for size in REFERENCE_BOXES:
        box = (max(1, round(size / REFERENCE_SCALE)),) * 2
        share = cv2.blur(weight, box)
        mean = cv2.blur(picture * weight[:, :, None], box) / (share[:, :, None] + EPSILON)
        local = share / (share + TRUST)
        first = size == REFERENCE_BOXES[0]
        reference = mean if first else reference + local[:, :, None] * (mean - reference)
        if size <= REACH:
            trust = np.maximum(trust, local)
    return reference, trust


def _project_out_backdrop(
    estimated: np.ndarray,
    observed: np.ndarray,
    reference: np.ndarray,
    background: np.ndarray,
    trust: np.ndarray,
) -> None:
    """Removes in place from ``estimated`` F (h, w, 3) float32 in 0–1 the component of
    ``F − F₊`` along ``B̂ − F₊`` where it is positive (towards the backdrop), weighted by
    ``trust`` (h, w) in 0–1 and by how near the ``observed`` colour I is to the backdrop (1
    within a third of F₊'s distance from B̂, 0 at that distance or further);
    ``reference`` F₊ and ``background`` B̂ are (h, w, 3) float32."""
    direction = background - reference
    length = np.einsum("ijk,ijk->ij", direction, direction) + EPSILON
    towards = np.einsum("ijk,ijk->ij", estimated - reference, direction) / length
    np.clip(towards, 0, None, out=towards)
    off = observed - background
    nearness = NEARNESS - NEARNESS * np.sqrt(np.einsum("ijk,ijk->ij", off, off) / length)
    np.clip(nearness, 0, 1, out=nearness)
    towards *= trust
    towards *= nearness
    estimated -= towards[:, :, None] * direction
    np.clip(estimated, 0, 1, out=estimated)
