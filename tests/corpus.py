"""Image files of every kind hotfolder must take or refuse, generated on the fly."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def jpeg(pixels: np.ndarray, quality: int = 92, **options: object) -> bytes:
    return encoded(Image.fromarray(pixels), "JPEG", quality=quality, **options)


def png(pixels: np.ndarray) -> bytes:
    return encoded(Image.fromarray(pixels), "PNG")


def exif_rotated_jpeg(pixels: np.ndarray, orientation: int) -> bytes:
    """A JPEG stored sideways with an EXIF orientation tag, as phones write them."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(pixels, exif=exif.tobytes())


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header announcing a huge image, followed by a few bytes of data: decoding it
    would allocate width × height × 3 bytes."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\x00" + b"\x00" * 30
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(row))
        + png_chunk(b"IEND", b"")
    )


def truncated_jpeg(pixels: np.ndarray) -> bytes:
    data = jpeg(pixels)
    return data[: len(data) * 2 // 3]


def load(path: Path) -> tuple[str, np.ndarray]:
    """A written image's mode and pixels, with the file closed again."""
    with Image.open(path) as image:
        return image.mode, np.asarray(image)


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
