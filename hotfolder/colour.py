"""Colour profiles: pictures to sRGB with littleCMS (Pillow's ImageCms), and sRGB's own profile.

A photo saved in Adobe RGB, ProPhoto, Display P3 (every iPhone) or CMYK holds numbers that mean
other colours than the same numbers in sRGB; read as sRGB, a product's red comes out orange or
dull. The model was trained on sRGB and every viewer assumes sRGB for an untagged file, so
pictures are converted on the way in and outputs are tagged as sRGB.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Mapping, Sequence

import cv2
import numpy as np
from PIL import Image, ImageCms

# Building a transform parses both profiles and precomputes tables (a few ms); photos from one
# camera or phone share one profile, so transforms are kept by profile.
TRANSFORM_CACHE = 32


class ProfileError(ValueError):
    """An embedded profile that littleCMS cannot read or use for this picture's colours."""


@functools.cache
def srgb_profile() -> bytes:
    """The ICC profile (v2, a few hundred bytes) that tags an output as sRGB, from littleCMS."""
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    return bytes(profile.tobytes())


# Colours spread over the cube, each channel at every level from black to full.
SRGB_PROBE = np.stack(np.meshgrid(*[np.arange(0, 256, 17, dtype=np.uint8)] * 3), axis=-1)


@functools.lru_cache(maxsize=TRANSFORM_CACHE)
def is_srgb(icc: bytes) -> bool:
    """Whether the profile is one of the many copies of sRGB (IEC 61966-2.1, Apple's, Google's
    compact one): converting through them would only cost time and add rounding. Judged by
    its colours, not its name: linear-light profiles are often named like sRGB too."""
    try:
        converted = to_srgb(SRGB_PROBE.reshape(16, -1, 3), icc).reshape(SRGB_PROBE.shape)
    except ProfileError:
        return False
    return bool(np.abs(converted.astype(np.int16) - SRGB_PROBE).max() <= 1)


def to_srgb(pixels: np.ndarray, icc: bytes, mode: str = "RGB") -> np.ndarray:
    """Pixels described by ``icc`` as sRGB: ``pixels`` (H, W, 3) uint8 for ``mode`` "RGB" or
    (H, W, 4) uint8 for "CMYK" (Pillow's convention: 0 is no ink); returns (H, W, 3) uint8.
    Perceptual intent, as photo software uses for images. Raises ProfileError when the profile
    cannot be read or is for another colour space than ``mode``."""
    transform = _transform(icc, mode)
    image = Image.fromarray(pixels, mode)
    converted = ImageCms.applyTransform(image, transform)
    assert converted is not None  # applyTransform returns None only with inPlace=True
    return np.array(converted)  # writable, as the model takes pixels without copying them


def from_srgb(rgb: tuple[int, int, int], icc: bytes) -> tuple[int, int, int]:
    """The numbers (0–255 each) that mean the sRGB colour ``rgb`` in the RGB profile ``icc``:
    a background asked for as sRGB, for an output in the photo's own colours. Relative
    colorimetric intent: a colour in both gamuts comes out exactly that colour. Raises
    ProfileError when the profile cannot be read or cannot be converted into."""
    pixel = Image.new("RGB", (1, 1), rgb)
    converted = ImageCms.applyTransform(pixel, _transform_from_srgb(icc))
    assert converted is not None  # applyTransform returns None only with inPlace=True
    red, green, blue = np.asarray(converted)[0, 0]
    return int(red), int(green), int(blue)


@functools.lru_cache(maxsize=TRANSFORM_CACHE)
def _transform_from_srgb(icc: bytes) -> ImageCms.ImageCmsTransform:
    """The littleCMS transform from sRGB to ``icc``."""
    try:
        target = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        intent = ImageCms.Intent.RELATIVE_COLORIMETRIC
        return ImageCms.buildTransform(srgb, target, "RGB", "RGB", intent)
    except (OSError, ImageCms.PyCMSError) as exc:
        raise ProfileError(f"colour profile cannot be converted into ({exc})") from exc


# HEIC and AVIF may say what their numbers mean with code points (nclx, ITU-T H.273) instead of
# a profile: the primaries' chromaticities and a transfer curve. The curves of ordinary (SDR)
# pictures, BT.709's kin and sRGB's, are decoded as sRGB's, as browsers do; HDR curves (PQ,
# HLG) are left alone.
NCLX_SRGB_PRIMARIES = {1, 2}  # BT.709 (sRGB's own), unspecified
NCLX_SDR_TRANSFERS = {1, 2, 6, 13, 14, 15}
NCLX_COLOURS = ("red", "green", "blue", "white")
SRGB_XY = ((0.64, 0.33), (0.30, 0.60), (0.15, 0.06), (0.3127, 0.3290))
BRADFORD = np.array(
    [[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]]
)
LINEAR_LEVELS = 65536  # steps of the linear-light table sRGB is encoded from


def nclx_to_srgb(pixels: np.ndarray, nclx: Mapping[str, object]) -> np.ndarray | None:
    """``pixels`` (H, W, 3) uint8 in the colours an nclx box describes (pillow-heif's
    ``nclx_profile``), as sRGB (H, W, 3) uint8, out-of-gamut colours clipped; None when they
    are sRGB already or cannot be converted (HDR curves, damaged chromaticities)."""
    if (nclx.get("color_primaries") in NCLX_SRGB_PRIMARIES
            or nclx.get("transfer_characteristics") not in NCLX_SDR_TRANSFERS):  # fmt: skip
        return None
    try:
        xy = [(float(str(nclx[f"color_primary_{c}_x"])), float(str(nclx[f"color_primary_{c}_y"])))
              for c in NCLX_COLOURS]  # fmt: skip
        matrix = np.linalg.inv(_rgb_to_xyz(SRGB_XY)) @ _adapt(xy[3], SRGB_XY[3]) @ _rgb_to_xyz(xy)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, np.linalg.LinAlgError):
        return None
    if not np.isfinite(matrix).all():
        return None
    # In linear light, scaled so the matrix lands on the table's steps; OpenCV's matrix
    # product and in-place clipping keep a 12 MP photo well under a second.
    levels = np.arange(256, dtype=np.float32) / 255
    linear = _srgb_decode(levels).astype(np.float32)[pixels]
    steps = cv2.transform(linear, (matrix * (LINEAR_LEVELS - 1)).astype(np.float32))
    np.clip(steps, 0, LINEAR_LEVELS - 1, out=steps)
    encode = np.linspace(0, 1, LINEAR_LEVELS, dtype=np.float32)
    table = np.round(_srgb_encode(encode) * 255).astype(np.uint8)
    srgb: np.ndarray = table[(steps + 0.5).astype(np.uint16)]
    return srgb


def _srgb_decode(v: np.ndarray) -> np.ndarray:
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def _srgb_encode(v: np.ndarray) -> np.ndarray:
    return np.where(v <= 0.0031308, v * 12.92, 1.055 * v ** (1 / 2.4) - 0.055)


def _xyz(x: float, y: float) -> np.ndarray:
    return np.array([x / y, 1.0, (1 - x - y) / y])


def _rgb_to_xyz(xy: Sequence[tuple[float, float]]) -> np.ndarray:
    """The 3×3 matrix from linear RGB with these primaries and white (x, y) to XYZ."""
    primaries = np.stack([_xyz(*xy[0]), _xyz(*xy[1]), _xyz(*xy[2])], axis=1)
    return primaries * np.linalg.solve(primaries, _xyz(*xy[3]))


def _adapt(source: tuple[float, float], target: tuple[float, float]) -> np.ndarray:
    """Bradford's chromatic adaptation from one white point (x, y) to another, in XYZ."""
    cone = BRADFORD @ _xyz(*source), BRADFORD @ _xyz(*target)
    adapted: np.ndarray = np.linalg.inv(BRADFORD) @ np.diag(cone[1] / cone[0]) @ BRADFORD
    return adapted


@functools.lru_cache(maxsize=TRANSFORM_CACHE)
def _transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform:
    """The littleCMS transform from ``icc`` to sRGB."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        return ImageCms.buildTransform(source, srgb, mode, "RGB", ImageCms.Intent.PERCEPTUAL)
    except (OSError, ImageCms.PyCMSError) as exc:
        raise ProfileError(f"colour profile cannot be used for {mode} pixels ({exc})") from exc
