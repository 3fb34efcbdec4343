"""Framing a cutout for a listing: cropped to the subject, or centred on a fixed-size canvas.

Marketplaces want the product centred on a plain background, filling most of a fixed frame (for
example a white square of at least 1600 px, the product filling about 85 % of it). The subject
is what the matte holds at least half opaque (``SUBJECT_ALPHA``): a faint shadow or a stray
speck of haze does not widen its box.
"""

from __future__ import annotations

import cv2
import numpy as np

from hotfolder.jobs import ImageError, Reason

SUBJECT_ALPHA = 128  # alpha levels at and above this are the subject
# A small photo is enlarged at most this much to fill a canvas: past it, enlarging only shows
# blur, and a listing is better with the product smaller than soft.
MAX_UPSCALE = 4.0

Box = tuple[int, int, int, int]  # x, y, width, height in pixels


def subject_box(alpha: np.ndarray) -> Box:
    """The bounding box of the subject in ``alpha`` (H, W) uint8. Raises ImageError when the
    matte holds no subject: a blank canvas would be published as a product photo."""
    box = cv2.boundingRect(cv2.inRange(alpha, SUBJECT_ALPHA, 255))
    if box[2] == 0 or box[3] == 0:
        raise ImageError(
            Reason.NO_SUBJECT,
            f"has no subject to frame: no pixel of the matte is {SUBJECT_ALPHA}/255 opaque",
        )
    x, y, width, height = box
    return x, y, width, height


def crop(rgb: np.ndarray, alpha: np.ndarray, padding: float) -> tuple[np.ndarray, np.ndarray]:
    """``rgb`` (H, W, 3) and ``alpha`` (H, W) cut to the subject's box, widened on each side by
    ``padding`` times the box's longer side (within the picture)."""
    x, y, width, height = subject_box(alpha)
    margin = round(padding * max(width, height))
    rows = slice(max(0, y - margin), min(alpha.shape[0], y + height + margin))
    cols = slice(max(0, x - margin), min(alpha.shape[1], x + width + margin))
    return rgb[rows, cols], alpha[rows, cols]


def on_canvas(
    rgb: np.ndarray,
    alpha: np.ndarray,
    canvas: tuple[int, int],
    padding: float,
    background: tuple[int, int, int] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The subject scaled to fit ``canvas`` (width, height) less ``padding`` times the canvas's
    width and height on each side, its box centred: (rgb (H, W, 3) uint8 filled with
    ``background`` or black where transparent, alpha (H, W) uint8). The soft edge around the
    subject's box (alpha below SUBJECT_ALPHA) comes along, as far as the canvas reaches."""
    x, y, width, height = subject_box(alpha)
    canvas_width, canvas_height = canvas
    # At least one pixel of room: a tiny canvas with wide padding still shows the subject.
    room_x = max(1, canvas_width - 2 * round(padding * canvas_width))
    room_y = max(1, canvas_height - 2 * round(padding * canvas_height))
    scale = min(room_x / width, room_y / height, MAX_UPSCALE)
    left_x, right_x = _reach(alpha, 1, x + width / 2, canvas_width / 2 / scale)
    top_y, bottom_y = _reach(alpha, 0, y + height / 2, canvas_height / 2 / scale)
    region = (slice(top_y, bottom_y), slice(left_x, right_x))
    size = (max(1, round((right_x - left_x) * scale)), max(1, round((bottom_y - top_y) * scale)))
    resample = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    scaled_rgb = cv2.resize(rgb[region], size, interpolation=resample)
    scaled_alpha = cv2.resize(alpha[region], size, interpolation=resample)
    # Where the region goes so that the subject box's centre is the canvas's.
    left = round(canvas_width / 2 - (x - left_x + width / 2) * scale)
    top = round(canvas_height / 2 - (y - top_y + height / 2) * scale)
    out_rgb = np.zeros((canvas_height, canvas_width, 3), np.uint8)
    out_rgb[:] = background or (0, 0, 0)
    out_alpha = np.zeros((canvas_height, canvas_width), np.uint8)
    _paste(out_rgb, scaled_rgb, left, top)
    _paste(out_alpha, scaled_alpha, left, top)
    return out_rgb, out_alpha


def _reach(alpha: np.ndarray, axis: int, centre: float, half: float) -> tuple[int, int]:
    """The [start, stop) pixels along ``axis`` (0: rows, 1: columns) of the subject with its
    soft edge (alpha above 0) that land on the canvas, ``half`` pixels of the photo either
    side of ``centre``. Only those are scaled: a faint haze over a whole 24 MP photo, enlarged
    4×, would take gigabytes."""
    present = np.flatnonzero(alpha.any(axis=1 - axis))
    start = max(int(present[0]), int(np.floor(centre - half)) - 1)
    stop = min(int(present[-1]) + 1, int(np.ceil(centre + half)) + 1)
    return start, stop


def _paste(target: np.ndarray, pixels: np.ndarray, left: int, top: int) -> None:
    """``pixels`` into ``target`` with their top-left corner at (left, top), clipped."""
    rows = slice(max(0, top), min(target.shape[0], top + pixels.shape[0]))
    cols = slice(max(0, left), min(target.shape[1], left + pixels.shape[1]))
    if rows.start >= rows.stop or cols.start >= cols.stop:
        return
    target[rows, cols] = pixels[rows.start - top : rows.stop - top,
                                cols.start - left : cols.stop - left]  # fmt: skip
