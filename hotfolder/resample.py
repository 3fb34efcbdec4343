"""Antialiased Lanczos-3 resizing as two matrix products, so it runs on any device.

The weights follow Pillow's ``Image.resize(..., LANCZOS)``, which rembg uses before U²-Net: the
kernel widens with the downscale factor (antialiasing), taps are normalised per output pixel.
Matching it keeps our mattes within rounding of rembg's on the same weights; a plain bicubic
resize costs about 2 % in MSE on real photos.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

LANCZOS_LOBES = 3


def _lanczos(x: np.ndarray) -> np.ndarray:
    inside = np.abs(x) < LANCZOS_LOBES
    return np.where(inside, np.sinc(x) * np.sinc(x / LANCZOS_LOBES), 0.0)


@functools.lru_cache(maxsize=256)
def lanczos_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 matrix: row i holds the taps of output pixel i."""
    scale = in_size / out_size
    stretch = max(scale, 1.0)  # widen the kernel when shrinking: that is the antialiasing
    support = LANCZOS_LOBES * stretch
    weights = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        centre = (i + 0.5) * scale
        first = max(int(centre - support + 0.5), 0)
        last = min(int(centre + support + 0.5), in_size)
        taps = np.arange(first, last)
        kernel = _lanczos((taps - centre + 0.5) / stretch)
        total = kernel.sum()
        weights[i, first:last] = kernel / total if total != 0 else 0
    return weights.astype(np.float32)


def resize_lanczos(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (C, H, W) float in 0–255 to (C, out_h, out_w) in 0–255, as Pillow does for 8-bit
    images: columns first, rounded and clipped to 8 bits, then rows."""
    height, width = image.shape[-2:]
    rows = torch.from_numpy(lanczos_weights(height, size[0])).to(image.device)
    cols = torch.from_numpy(lanczos_weights(width, size[1])).to(image.device)
    across = (image @ cols.T).round_().clamp_(0, 255)
    return (rows @ across).round_().clamp_(0, 255)
