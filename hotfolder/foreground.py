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
backdrop colour back into F. So F is then held to the subject's confident interior, the idea of
retouchers' "Decontaminate Colors" (Photoshop's Select and Mask: edge colour taken from nearby
fully selected pixels). The subject's colour ``F₊`` and the backdrop's ``B₋`` are the means of
the photo over the pixels well inside the matte's opaque and clear regions, ``blur(w·I)/blur(w)``,
at decreasing radii; where the photo's colour is a mix of the two (on the line from ``F₊`` to
``B₋``, near ``B₋``), the part of ``F − F₊`` that points towards ``B₋ − F₊`` is projected out
(this projection is ours, not the paper's). Colour off that line stays: texture, shading, a
strand of hair of another colour than the subject's interior. The subject's region is taken
well inside the opaque one because the model also calls opaque a ring of the true soft edge;
distances and radii are in the model's pixels (a 320th of the picture's longer side), since its
errors are.

A soft part of the subject whose own colour happens to lie on that line, near the backdrop's, is
taken for backdrop and given the interior's colour.

Only pixels with 0 < α ≤ 245 change: near-opaque and opaque pixels keep the photo's colour. Only
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
OPAQUE = 246  # alpha levels from which a pixel keeps the photo's colour: above the band 10–245
# The confident subject and backdrop, in the model's pixels (a 320th of the picture's longer
# side, the size U²-Net sees): (inset, reach) of each, the pixels at least `inset` inside the
# matte's opaque (clear) region, and the box within which some must lie for the projection to
# act. u2netp calls opaque up to about 12 model pixels of a wide soft edge, hence the subject's
# deep inset; its clear region is backdrop but for the faintest strands. Their means are taken
# over boxes of REFERENCE_BOXES, each smaller one trusted where it holds enough of the region,
# on the picture shrunk to REFERENCE_SCALE model pixels per pixel: these means are smooth.
MODEL_PIXELS = 320
SUBJECT_REGION = (13.0, 72)
BACKDROP_REGION = (4.0, 48)
REFERENCE_BOXES = (144, 72, 48, 24)
REFERENCE_SCALE = 3
# The projection is whole where the photo is within 2/3 of |B₋ − F₊| of the backdrop B₋,
# fading to none at that distance: a colour as far from the backdrop as the subject is stays.
NEARNESS = np.float32(3)
# ... and whole where the photo is within 5 % of |B₋ − F₊| of the line from F₊ to B₋, none
# from 10 % (the mixes of subject and backdrop lie on that line, noise about it).
COLOUR_LINE = (np.float32(0.05), np.float32(0.1))
TRUST = np.float32(1e-3)  # fraction of a box's area of interior at which its mean is half-trusted


def estimate(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8 with the colour of every semi-transparent pixel (0 < ``alpha``
    (H, W) uint8 < OPAQUE) replaced by its estimated foreground colour; a new array when any pixel
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
    # one small (h, w, 7) grid, enlarged tile by tile: enlarging it whole costs more than the rest
    confident = np.dstack(_confident_colours(image, alpha, model_pixel))
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
            grid = _enlarged_tile(confident, (height, width), inner)
            _project_out_backdrop(estimated, image[inner], grid[:, :, 0:3], grid[:, :, 3:6],
                                  grid[:, :, 6])  # fmt: skip
            pixels = (estimated * 255 + 0.5).astype(np.uint8)
            np.copyto(out[inner], pixels, where=band[inner][:, :, None].astype(bool))


def _enlarged_tile(
    small: np.ndarray, shape: tuple[int, int], inner: tuple[slice, slice]
) -> np.ndarray:
    """The ``inner`` (rows, columns) part of ``small`` (h, w, C) float32 enlarged to ``shape``
    (height, width): bilinear with pixel centres aligned, as ``_enlarged``, but positions to a
    32nd of a pixel (cv2.remap), which these smooth means do not notice."""
    rows, cols = inner
    scale_y, scale_x = small.shape[0] / shape[0], small.shape[1] / shape[1]
    ys = (np.arange(rows.start, rows.stop, dtype=np.float32) + 0.5) * scale_y - 0.5
    xs = (np.arange(cols.start, cols.stop, dtype=np.float32) + 0.5) * scale_x - 0.5
    map_y = np.repeat(ys[:, None], xs.size, axis=1)
    map_x = np.repeat(xs[None, :], ys.size, axis=0)
    return cv2.remap(small, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


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


def _confident_colours(
    image: np.ndarray, alpha: np.ndarray, model_pixel: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(subject's colours F₊, backdrop's colours B₋, both (h, w, 3) float32, trust (h, w)
    float32 in 0–1), on ``image`` shrunk to REFERENCE_SCALE model pixels per pixel: each the
    mean of the photo over the pixels well inside the matte's opaque (respectively clear)
    region, and how much of both lies within reach of each pixel."""
    height, width = alpha.shape
    scale = max(1.0, REFERENCE_SCALE * model_pixel)
    shape = (max(1, round(width / scale)), max(1, round(height / scale)))
    picture, small = _shrunk(image, shape), _shrunk(alpha, shape)
    to_model_pixels = np.float32(scale / model_pixel)
    opaque, clear = small >= np.float32(254.5 / 255), small <= np.float32(0.5 / 255)
    subject, subject_trust = _means_inside(picture, opaque, to_model_pixels, *SUBJECT_REGION)
    backdrop, backdrop_trust = _means_inside(picture, clear, to_model_pixels, *BACKDROP_REGION)
    return subject, backdrop, np.minimum(subject_trust, backdrop_trust)


def _means_inside(
    picture: np.ndarray,
    region: np.ndarray,
    to_model_pixels: np.float32,
    inset: float,
    reach: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(means (h, w, 3) float32 of ``picture`` over ``region`` (h, w) bool less its outer
    ``inset`` model pixels, at the radii of REFERENCE_BOXES, each smaller one taking over
    where it holds enough of the region; trust (h, w) in 0–1 that some of it lies within a box
    of ``reach`` model pixels)."""
    depth = cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, 3) * to_model_pixels
    # weights rise from 0 at the inset to 1 at twice it, so the means move smoothly
    weight = np.clip(depth / np.float32(inset) - 1, 0, 1).astype(np.float32)
    means = picture
    trust = np.zeros_like(weight)
    for size in REFERENCE_BOXES:
        box = (max(1, round(size / REFERENCE_SCALE)),) * 2
        share = cv2.blur(weight, box)
        mean = cv2.blur(picture * weight[:, :, None], box) / (share[:, :, None] + EPSILON)
        local = share / (share + TRUST)
        first = size == REFERENCE_BOXES[0]
        means = mean if first else means + local[:, :, None] * (mean - means)
        if size <= reach:
            trust = np.maximum(trust, local)
    return means, trust


def _project_out_backdrop(
    estimated: np.ndarray,
    observed: np.ndarray,
    reference: np.ndarray,
    background: np.ndarray,
    trust: np.ndarray,
) -> None:
    """Removes in place from ``estimated`` F (h, w, 3) float32 in 0–1 the component of
    ``F − F₊`` along ``B₋ − F₊`` where it is positive (towards the backdrop), weighted by
    ``trust`` (h, w) in 0–1 and by how near the ``observed`` colour I (h, w, 3) is to the
    backdrop (NEARNESS) and to the line from F₊ to B₋ (COLOUR_LINE); ``reference`` F₊ and
    ``background`` B₋ are (h, w, 3) float32."""
    direction = background - reference
    length = np.einsum("ijk,ijk->ij", direction, direction) + EPSILON
    towards = np.einsum("ijk,ijk->ij", estimated - reference, direction) / length
    np.clip(towards, 0, None, out=towards)
    off = observed - background
    along = np.einsum("ijk,ijk->ij", off, direction) / length
    across = off - along[:, :, None] * direction
    nearness = NEARNESS - NEARNESS * np.sqrt(np.einsum("ijk,ijk->ij", off, off) / length)
    # a mix of subject and backdrop lies on the line between them; a colour off it is the
    # subject's own (green hair between an orange face and a dark-green backdrop)
    off_line = np.sqrt(np.einsum("ijk,ijk->ij", across, across) / length)
    on_line = (COLOUR_LINE[1] - off_line) / np.float32(COLOUR_LINE[1] - COLOUR_LINE[0])
    np.minimum(nearness, on_line, out=nearness)
    np.clip(nearness, 0, 1, out=nearness)
    towards *= trust
    towards *= nearness
    estimated -= towards[:, :, None] * direction
    np.clip(estimated, 0, 1, out=estimated)
