"""Reading untrusted image files into RGB(A) arrays, and encoding results. Pure functions.

Pillow reads the header (format by content, size, mode, EXIF orientation) so that every limit is
checked before a single pixel is decoded. Baseline JPEGs, by far the most common input, are then
decoded by OpenCV (libjpeg-turbo, faster); every other kind by Pillow, which knows the awkward modes
(CMYK, palettes with transparency, 16-bit). Pillow and OpenCV both report truncated data as an error
instead of returning a half-grey picture.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from hotfolder import png
from hotfolder.jobs import ImageError, Reason

# Formats accepted, identified by content; Pillow never tries any other decoder on our input.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_BYTES = 512 * 1024 * 1024

# Our own pixel cap is checked from the header and raises; Pillow's global one would only warn.
Image.MAX_IMAGE_PIXELS = None

EXIF_ORIENTATION = 0x0112
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


@dataclass(frozen=True)
class Picture:
    """A decoded image, upright: ``rgb`` is (H, W, 3) uint8; ``alpha`` (H, W) uint8 or None."""

    rgb: np.ndarray
    alpha: np.ndarray | None

    @property
    def size(self) -> tuple[int, int]:
        height, width = self.rgb.shape[:2]
        return width, height


def read_file(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a regular file, opened without following a symlink and checked on the open
    descriptor, so the path is never resolved twice."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):
            raise ImageError(Reason.NOT_A_FILE, "is a symbolic link, not a file") from exc
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise ImageError(Reason.UNREADABLE, "cannot be read: permission denied") from exc
        if exc.errno in (errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP):  # a socket, a device
            raise ImageError(Reason.NOT_A_FILE, "is not a regular file") from exc
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(Reason.NOT_A_FILE, "is not a regular file")
        if info.st_size == 0:
            raise ImageError(Reason.EMPTY, "is empty (0 bytes)")
        if info.st_size > max_bytes:
            raise ImageError(
                Reason.TOO_LARGE, f"is {info.st_size} bytes, over the limit of {max_bytes}"
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(max_bytes + 1)
    finally:
        os.close(fd)


def _open(data: bytes) -> Image.Image:
    if not data:
        raise ImageError(Reason.EMPTY, "is empty (0 bytes)")
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError(
            Reason.UNSUPPORTED, "is not a JPEG, PNG, WebP, BMP or TIFF image"
        ) from None
    except Exception as exc:  # a damaged header raises anything from SyntaxError to struct.error
        raise ImageError(Reason.CORRUPT, f"has a damaged header ({exc})") from exc


def _orientation(image: Image.Image) -> int:
    try:
        orientation = int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # unreadable EXIF is not worth rejecting the photo for
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def check_limits(width: int, height: int, frames: int, max_pixels: int) -> None:
    pixels = width * height
    if pixels == 0:
        raise ImageError(Reason.CORRUPT, "has no pixels (width or height is 0)")
    if pixels > max_pixels:
        raise ImageError(
            Reason.TOO_MANY_PIXELS,
            f"is {width}×{height} = {pixels / 1e6:.1f} MP, "
            f"over the limit of {max_pixels / 1e6:.1f} MP",
        )
    if frames > 1:
        raise ImageError(
            Reason.UNSUPPORTED, f"has {frames} frames; animated images are not supported"
        )


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Picture:
    """Decode an image file's bytes, upright (EXIF orientation applied), as 8-bit RGB(A)."""
    image = _open(data)
    # Only header fields before this check: Pillow decodes a whole PNG to look for its EXIF.
    check_limits(image.width, image.height, int(getattr(image, "n_frames", 1)), max_pixels)
    try:
        if image.format == "JPEG" and image.mode in ("RGB", "L"):
            orientation = _orientation(image)
            picture = _decode_jpeg_opencv(data)
        else:
            image.load()
            orientation = _orientation(image)
            picture = _decode_pillow(image)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(Reason.CORRUPT, f"cannot be decoded: {exc}") from exc
    return orient(picture, orientation)


def _decode_jpeg_opencv(data: bytes) -> Picture:
    flags = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
    rgb = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if rgb is None:
        raise ImageError(Reason.CORRUPT, "cannot be decoded: truncated or damaged JPEG data")
    return Picture(rgb=rgb, alpha=None)


def _decode_pillow(image: Image.Image) -> Picture:
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES:
        gray = _to_8bit(np.array(image))
        return Picture(rgb=np.repeat(gray[:, :, None], 3, axis=2), alpha=None)
    if mode == "F":
        raise ImageError(Reason.UNSUPPORTED, "is a floating-point image; not supported")
    has_alpha = mode in ALPHA_MODES or "transparency" in image.info
    if has_alpha:
        rgba = np.array(image.convert("RGBA"))
        return Picture(rgb=np.ascontiguousarray(rgba[:, :, :3]), alpha=rgba[:, :, 3].copy())
    return Picture(rgb=np.array(image.convert("RGB")), alpha=None)


def _to_8bit(values: np.ndarray) -> np.ndarray:
    """16-bit samples to 8-bit with rounding (65535 → 255)."""
    wide = np.clip(values.astype(np.uint32), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


# EXIF orientation → what makes the stored pixels upright (as Pillow's ImageOps.exif_transpose).
UPRIGHT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, k=1),
}


def orient(picture: Picture, orientation: int) -> Picture:
    """Apply an EXIF orientation (1–8) so the picture is upright."""
    fix = UPRIGHT.get(orientation)
    if fix is None:
        return picture
    alpha = None if picture.alpha is None else np.ascontiguousarray(fix(picture.alpha))
    return Picture(rgb=np.ascontiguousarray(fix(picture.rgb)), alpha=alpha)


def encode_png(pixels: np.ndarray, compression: int | str = "fast") -> bytes:
    """PNG from RGBA (H, W, 4), RGB (H, W, 3) or gray (H, W) uint8 pixels. ``compression`` is
    ``"fast"`` (ISA-L, see png.py) or a zlib level 0–9 (smaller files, much slower at 6–9)."""
    if compression == "fast":
        return png.encode(pixels)
    if pixels.ndim == 3:
        code = cv2.COLOR_RGBA2BGRA if pixels.shape[2] == 4 else cv2.COLOR_RGB2BGR
        pixels = cv2.cvtColor(pixels, code)
    ok, encoded = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, int(compression)])
    if not ok:
        raise ValueError("PNG encoding failed")
    return encoded.tobytes()


def encode_jpeg(rgb: np.ndarray, quality: int = 92) -> bytes:
    ok, encoded = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise ValueError("JPEG encoding failed")
    return encoded.tobytes()
