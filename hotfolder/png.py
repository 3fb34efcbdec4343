"""Standard PNG files written fast: the Up filter in NumPy, then ISA-L's deflate.

Writing the outputs costs more CPU than the model itself on a GPU server, and zlib is most of it.
Intel's ISA-L deflate (the ``isal`` package) is several times faster than zlib at level 1 and
releases the GIL, so the publish threads encode in parallel. Measured on a 1 MP cutout: 8 ms
and 1.05 MB, against 56–76 ms and 0.95 MB for OpenCV at level 1. The files are ordinary 8-bit
PNGs that any reader opens; only the choice of filter and compressor is ours.

PNG's container is four fields per chunk, which is all that is written here; no PNG library
takes an already-compressed image stream, so the framing cannot come from one.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from isal import isal_zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEADER_END = len(SIGNATURE) + 12 + 13  # IHDR, always first, always 13 bytes of data
INCH = 0.0254  # metres; PNG states resolution in pixels per metre
COLOUR_TYPES = {1: 0, 3: 2, 4: 6}  # gray, RGB, RGBA by channel count
FILTER_UP = 2  # each byte minus the byte above it: cheap, and good on photos and mattes
ISAL_LEVEL = 1  # ISA-L's levels are 0–3; 1 was the fastest per byte saved on cutouts


def encode(pixels: np.ndarray) -> bytes:
    """PNG of gray (H, W), RGB (H, W, 3) or RGBA (H, W, 4) uint8 pixels."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"PNG pixels must be uint8, not {pixels.dtype}")
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if pixels.ndim not in (2, 3) or channels not in COLOUR_TYPES:
        raise ValueError(f"cannot write pixels of shape {pixels.shape} as PNG")
    height, width = pixels.shape[:2]
    if height == 0 or width == 0:
        raise ValueError("cannot write an empty image as PNG")
    header = struct.pack(">IIBBBBB", width, height, 8, COLOUR_TYPES[channels], 0, 0, 0)
    data = isal_zlib.compress(up_filtered(pixels.reshape(height, width * channels)), ISAL_LEVEL)
    return b"".join((SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", data), _chunk(b"IEND")))


def up_filtered(rows: np.ndarray) -> np.ndarray:
    """Scanlines with PNG's Up filter: a filter-type byte, then each byte minus the one above
    (uint8 arithmetic wraps modulo 256, as the filter is defined). The first row has no row above,
    which the format treats as zeros."""
    scanlines = np.empty((rows.shape[0], rows.shape[1] + 1), np.uint8)
    scanlines[:, 0] = FILTER_UP
    scanlines[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=scanlines[1:, 1:])
    return scanlines


def _chunk(kind: bytes, data: bytes = b"") -> bytes:
    crc = isal_zlib.crc32(data, isal_zlib.crc32(kind))
    return b"".join((struct.pack(">I", len(data)), kind, data, struct.pack(">I", crc)))


def metadata_chunks(
    dpi: tuple[float, float] | None = None,
    icc: bytes | None = None,
    srgb: bool = False,
    exif: bytes | None = None,
    xmp: bytes | None = None,
) -> bytes:
    """Ancillary chunks, to go before the image data: ``pHYs`` from ``dpi`` (x, y) dots per
    inch; ``sRGB`` when ``srgb`` (13 bytes, where the sRGB profile would take hundreds), else
    ``iCCP`` with the ``icc`` profile; ``eXIf`` with ``exif`` (a bare TIFF structure); ``iTXt``
    with the ``xmp`` packet under the key Adobe defined for PNG."""
    chunks = []
    if dpi is not None:
        per_metre = (round(dpi[0] / INCH), round(dpi[1] / INCH))
        chunks.append(_chunk(b"pHYs", struct.pack(">IIB", *per_metre, 1)))  # 1: the metre
    if srgb:
        chunks.append(_chunk(b"sRGB", b"\x00"))  # rendering intent: perceptual
    elif icc is not None:
        chunks.append(_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc)))
    if exif is not None:
        chunks.append(_chunk(b"eXIf", exif))
    if xmp is not None:
        chunks.append(_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp))
    return b"".join(chunks)


def with_chunks(data: bytes, chunks: bytes) -> bytes:
    """A PNG file with ``chunks`` inserted right after its header, where every ancillary chunk
    that describes the pixels may stand."""
    if not data.startswith(SIGNATURE) or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    return data[:HEADER_END] + chunks + data[HEADER_END:]
