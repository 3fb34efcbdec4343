"""Colour profiles: pictures to sRGB with littleCMS (Pillow's ImageCms), and sRGB's own profile.

A photo saved in Adobe RGB, ProPhoto, Display P3 (every iPhone) or CMYK holds numbers that mean
other colours than the same numbers in sRGB; read as sRGB, a product's red comes out orange or
dull. The model was trained on sRGB and every viewer assumes sRGB for an untagged file, so
pictures are converted on the way in and outputs are tagged as sRGB.
"""

from __future__ import annotations

import functools
import io

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


@functools.lru_cache(maxsize=TRANSFORM_CACHE)
def _transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform:
    """The littleCMS transform from ``icc`` to sRGB."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        return ImageCms.buildTransform(source, srgb, mode, "RGB", ImageCms.Intent.PERCEPTUAL)
    except (OSError, ImageCms.PyCMSError) as exc:
        raise ProfileError(f"colour profile cannot be used for {mode} pixels ({exc})") from exc
