"""Reading untrusted image files into RGB(A) arrays, and encoding results. Pure functions.

Pillow reads the header (format by content, size, mode, EXIF orientation) so that every limit is
checked before a single pixel is decoded. Baseline JPEGs, by far the most common input, are then
decoded by OpenCV (libjpeg-turbo, faster); every other kind by Pillow, which knows the awkward modes
(CMYK, palettes with transparency, 16-bit), and HEIC/HEIF (the iPhone's default) by pillow-heif
(libheif). Pillow and OpenCV both report truncated data as an error instead of returning a
half-grey picture. Pictures in another colour space than sRGB are converted to sRGB (colour.py).
"""

from __future__ import annotations

import errno
import functools
import io
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from hotfolder import colour, png
from hotfolder.jobs import ImageError, Reason
from hotfolder.metadata import Metadata, exif_payload
from hotfolder.metadata import read as read_metadata

# Formats accepted, identified by content; Pillow never tries any other decoder on our input.
# A camera JPEG with a preview opens as an MPO (several pictures, the first the primary one); a
# HEIC may also hold several (a burst, a depth map): of both, the primary picture is the photo.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "HEIF", "AVIF")
PRIMARY_PICTURE_FORMATS = {"MPO", "HEIF"}
FORMAT_NAMES = "a JPEG, PNG, WebP, BMP, TIFF, HEIC/HEIF or AVIF image"
# For data that cannot be a HEIC: Pillow refuses to open anything when a format it is asked to
# try is not registered, and pillow-heif's is only once a HEIC has been met.
WITHOUT_HEIF = tuple(name for name in FORMATS if name != "HEIF")

DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_BYTES = 512 * 1024 * 1024

# Our own pixel cap is checked from the header and raises; Pillow's global one would only warn.
Image.MAX_IMAGE_PIXELS = None

EXIF_ORIENTATION = 0x0112
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


@dataclass(frozen=True)
class Picture:
    """A decoded image, upright: ``rgb`` is (H, W, 3) uint8 sRGB; ``alpha`` (H, W) uint8 or None;
    ``meta`` what the file said about itself; ``source_rgb`` (H, W, 3) uint8 the colours as
    stored in the file, in the profile ``meta.icc``, when asked for and different from ``rgb``."""

    rgb: np.ndarray
    alpha: np.ndarray | None
    meta: Metadata = field(default_factory=Metadata)
    source_rgb: np.ndarray | None = None

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


# Signatures of the formats whose end can be found.
JPEG_SOI = b"\xff\xd8"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG markers without a length field: TEM and RST0–RST7.
JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}
# Zero bytes at the end of compressed image data that mean "not written yet", not chance.
ZERO_RUN = 64


LEADING_ZEROS = 16  # bytes


def looks_incomplete(data: bytes) -> ImageError | None:
    """Whether these bytes look like the start of a file that is still being written, and
    the error the file deserves if it never changes again; None when they look whole.

    Decoders do not always notice: a copy that set its final size first (Windows Explorer
    over SMB) and stopped part-way ends in a run of zero bytes, and a JPEG ending so decodes
    without error, its missing rows a flat fill. So the end of the data is checked by format:
    JPEG must reach its end marker (EOI) after its first scan, PNG its IEND chunk, WebP the
    length its RIFF header declares, HEIC and AVIF the end of their last box; what follows the
    end (zero padding, the video of a motion photo) does not matter. A file of zero bytes only
    has had nothing written yet. Other formats have no end to find; their decoders report what
    is missing."""
    if not data:
        return ImageError(Reason.EMPTY, "is empty (0 bytes)")
    if data[0] == 0 and data.count(0) == len(data):
        return ImageError(Reason.EMPTY, f"holds only zero bytes ({len(data)})")
    if data.startswith(bytes(LEADING_ZEROS)):
        # No image format starts so; a copy that writes out of order (segmented downloads,
        # SMB writes completing out of order) leaves the start unwritten for a while.
        return ImageError(Reason.CORRUPT, "starts with zero bytes: not written from the start yet")
    if data.startswith(JPEG_SOI) or data == JPEG_SOI[:1]:
        missing = _jpeg_missing(data)
    elif data.startswith(PNG_SIGNATURE) or PNG_SIGNATURE.startswith(data):
        missing = _png_missing(data)
    elif data.startswith(b"RIFF") or b"RIFF".startswith(data):
        missing = _webp_missing(data)
    elif data[4:8] == b"ftyp" or (4 < len(data) < 8 and b"ftyp".startswith(data[4:])):
        missing = _bmff_missing(data)
    else:
        return None
    if missing is None:
        return None
    zeros = len(data) - len(data.rstrip(b"\0"))
    if zeros >= ZERO_RUN:
        missing += f" (its last {zeros} bytes are zeros: a copy that stopped part-way?)"
    return ImageError(Reason.CORRUPT, f"is truncated: {missing}")


def _jpeg_missing(data: bytes) -> str | None:
    """What the JPEG lacks: segments are walked by their lengths up to the first scan (an
    EXIF thumbnail's own end marker is inside a segment), then the end marker is looked for.
    In entropy-coded data 0xFF is always followed by 0x00 or a marker, so FF D9 there is EOI."""
    end = len(data)
    if end < 3:
        return "the JPEG data stops inside its signature"
    at = 2
    while True:
        marker_at = at
        while at < end and data[at] == 0xFF:  # a marker, after any fill bytes
            at += 1
        if at >= end:
            return "the JPEG data stops between two segments, before its end marker (EOI)"
        marker = data[at]
        if at == marker_at or marker == 0x00:
            # Not a marker where one belongs: zeros not yet written, or junk a decoder may
            # skip. Only an end marker somewhere after it makes the file whole.
            return _jpeg_end_after(data, at, "the JPEG data has no end marker (EOI)")
        at += 1
        if marker == 0xD9:
            return None
        if marker in JPEG_STANDALONE:
            continue
        length = int.from_bytes(data[at : at + 2], "big")
        if at + 2 > end or at + length > end:
            return f"the JPEG data stops inside a segment (marker FF{marker:02X})"
        if length < 2:
            return _jpeg_end_after(data, at, "the JPEG data has no end marker (EOI)")
        at += length
        if marker == 0xDA:  # start of scan: the image data
            return _jpeg_end_after(
                data, at, "the JPEG image data stops before its end marker (EOI)"
            )


def _jpeg_end_after(data: bytes, at: int, missing: str) -> str | None:
    return None if data.find(b"\xff\xd9", at) >= 0 else missing


def _png_missing(data: bytes) -> str | None:
    """What the PNG lacks: chunks are walked by their lengths up to IEND."""
    end = len(data)
    if end < len(PNG_SIGNATURE):
        return "the PNG data stops inside its signature"
    at = len(PNG_SIGNATURE)
    while True:
        if at + 8 > end:
            return "the PNG data stops before its IEND chunk"
        kind = data[at + 4 : at + 8]
        if not kind.isalpha():  # chunk types are four ASCII letters
            return "the PNG data stops before its IEND chunk (no chunk where one belongs)"
        at += 12 + int.from_bytes(data[at : at + 4], "big")
        if at > end:
            return f"the PNG data stops inside its {kind.decode()} chunk"
        if kind == b"IEND":
            return None


def _webp_missing(data: bytes) -> str | None:
    """What a WebP lacks: the length its RIFF header declares, chunks where they belong, and
    image data that does not end in a run of zeros (entropy-coded data never does)."""
    end = len(data)
    if end < 12:
        return "the RIFF data stops inside its header"
    if data[8:12] != b"WEBP":
        return None  # not ours to judge: the decoder refuses it
    declared = 8 + int.from_bytes(data[4:8], "little")
    if declared > end:
        return f"the WebP data is {end} of the {declared} bytes its header declares"
    zeros_from = len(data.rstrip(b"\0"))
    at = 12
    while at + 8 <= declared:
        kind = data[at : at + 4]
        if kind == b"\0\0\0\0":
            return "the WebP data stops before its last chunk (zeros where a chunk belongs)"
        payload_end = at + 8 + int.from_bytes(data[at + 4 : at + 8], "little")
        if kind in (b"VP8 ", b"VP8L", b"ALPH") and payload_end - zeros_from >= ZERO_RUN:
            return f"the WebP image data ({kind.decode().strip()}) stops part-way"
        at = payload_end + (payload_end & 1)  # chunks are padded to an even length
    return None


def _bmff_missing(data: bytes) -> str | None:
    """What a HEIC/HEIF or AVIF file (ISO base media boxes) lacks: its top-level boxes are
    walked by their sizes to the end of the data."""
    end, at = len(data), 0
    while at < end:
        if at + 8 > end:
            return "the HEIF data stops inside a box header"
        size, kind = int.from_bytes(data[at : at + 4], "big"), data[at + 4 : at + 8]
        if size == 1:  # a 64-bit size follows the type
            if at + 16 > end:
                return "the HEIF data stops inside a box header"
            size = int.from_bytes(data[at + 8 : at + 16], "big")
        elif size == 0:  # the box runs to the end of the file
            return None
        if size < 8:
            return None  # not ours to judge: the decoder refuses it
        if at + size > end:
            name = kind.decode("latin-1").strip()
            return f"the HEIF data stops inside its {name!r} box ({end - at} of {size} bytes)"
        at += size
    return None


def _open(data: bytes) -> Image.Image:
    if not data:
        raise ImageError(Reason.EMPTY, "is empty (0 bytes)")
    formats = WITHOUT_HEIF
    if data[4:8] == b"ftyp":  # ISO base media boxes: perhaps a HEIC
        _register_heif()
        formats = FORMATS
    try:
        return Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError:
        raise ImageError(Reason.UNSUPPORTED, f"is not {FORMAT_NAMES}") from None
    except Exception as exc:  # a damaged header raises anything from SyntaxError to struct.error
        raise ImageError(Reason.CORRUPT, f"has a damaged header ({one_line(exc)})") from exc


@functools.cache
def _register_heif() -> None:
    """Let Pillow open HEIC/HEIF, through pillow-heif: done when a file in ISO base media boxes
    is first met rather than on import, as importing pillow-heif takes 0.02 s of every
    one-shot command's start (its opener only ever accepts such files)."""
    import pillow_heif

    pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)


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


def _frames(image: Image.Image) -> int:
    if image.format in PRIMARY_PICTURE_FORMATS:
        return 1
    try:
        return int(getattr(image, "n_frames", 1))
    except Exception as exc:  # counting reads every frame's header: a damaged one raises anything
        raise ImageError(Reason.CORRUPT, f"has a damaged frame header ({one_line(exc)})") from exc


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, keep_source: bool = False) -> Picture:
    """Decode an image file's bytes, upright (EXIF orientation applied), as 8-bit sRGB(A), with
    its metadata; ``keep_source`` also keeps the colours as stored when they were converted."""
    image = _open(data)
    # Only header fields before this check: Pillow decodes a whole PNG to look for its EXIF.
    check_limits(image.width, image.height, _frames(image), max_pixels)
    try:
        if image.format in ("JPEG", "MPO") and image.mode in ("RGB", "L"):
            picture = _decode_jpeg_opencv(data)
        else:
            image.load()
            picture = _decode_pillow(image)
        orientation = _orientation(image)
        meta = read_metadata(image)
        picture = replace(picture, meta=meta)
        if meta.icc is None:
            picture = _nclx_to_srgb(picture, image.info.get("nclx_profile"))
        picture = _to_srgb(picture, image.mode, keep_source)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(Reason.CORRUPT, f"cannot be decoded: {one_line(exc)}") from exc
    return orient(picture, orientation)


def _to_srgb(picture: Picture, mode: str, keep_source: bool) -> Picture:
    """The picture's colours in sRGB when its file embeds another RGB profile. A profile that
    littleCMS cannot read, or one for other colours (a gray profile), is ignored: the pixels are
    then taken as sRGB, as every viewer without colour management would show them."""
    icc = picture.meta.icc
    if icc is None or mode == "CMYK" or colour.is_srgb(icc):  # CMYK was converted on decoding
        return picture
    try:
        rgb = colour.to_srgb(picture.rgb, icc)
    except colour.ProfileError:
        return picture
    return replace(picture, rgb=rgb, source_rgb=picture.rgb if keep_source else None)


def _nclx_to_srgb(picture: Picture, nclx: object) -> Picture:
    """The picture's colours in sRGB when a HEIC says them with code points, not a profile.
    There is no profile to keep, so ``colours: source`` outputs are sRGB for these."""
    rgb = colour.nclx_to_srgb(picture.rgb, nclx) if isinstance(nclx, Mapping) else None
    return picture if rgb is None else replace(picture, rgb=rgb)


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
    icc = image.info.get("icc_profile")
    if mode == "CMYK" and icc:
        # Pillow's own CMYK→RGB ignores the inks' profile: prints come out over-saturated.
        try:
            return Picture(rgb=colour.to_srgb(np.asarray(image), icc, "CMYK"), alpha=None)
        except colour.ProfileError:
            pass
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

    def upright(pixels: np.ndarray | None) -> np.ndarray | None:
        return None if pixels is None else np.ascontiguousarray(fix(pixels))

    rgb = np.ascontiguousarray(fix(picture.rgb))
    return replace(picture, rgb=rgb, alpha=upright(picture.alpha),
                   source_rgb=upright(picture.source_rgb))  # fmt: skip


def encode_png(
    pixels: np.ndarray, compression: int | str = "fast", meta: Metadata | None = None
) -> bytes:
    """PNG from RGBA (H, W, 4), RGB (H, W, 3) or gray (H, W) uint8 pixels. ``compression`` is
    ``"fast"`` (ISA-L, see png.py) or a zlib level 0–9 (smaller files, much slower at 6–9).
    ``meta`` is written with it: resolution, colour profile (sRGB's as the 13-byte sRGB chunk),
    EXIF and XMP."""
    if compression == "fast":
        data = png.encode(pixels)
    else:
        if pixels.ndim == 3:
            code = cv2.COLOR_RGBA2BGRA if pixels.shape[2] == 4 else cv2.COLOR_RGB2BGR
            pixels = cv2.cvtColor(pixels, code)
        params = [cv2.IMWRITE_PNG_COMPRESSION, int(compression)]
        ok, encoded = cv2.imencode(".png", pixels, params)
        if not ok:
            raise ValueError("PNG encoding failed")
        data = encoded.tobytes()
    if meta is None:
        return data
    srgb = meta.icc is not None and meta.icc == colour.srgb_profile()
    exif = None if meta.exif is None else exif_payload(meta.exif)
    return png.with_chunks(data, png.metadata_chunks(meta.dpi, meta.icc, srgb, exif, meta.xmp))


def encode_jpeg(rgb: np.ndarray, quality: int = 92, meta: Metadata | None = None) -> bytes:
    """JPEG from RGB (H, W, 3) or gray (H, W) uint8 pixels with ``meta``: resolution as JFIF
    density in dots per inch, colour profile, EXIF and XMP (each left out when over the 64 KiB
    a JPEG segment holds). Pillow's encoder is libjpeg-turbo,
    as OpenCV's, at the same settings (4:2:0); OpenCV cannot write any of the metadata."""
    return _encode_pillow(rgb, "JPEG", meta, quality=quality)


def encode_webp(
    pixels: np.ndarray, quality: int = 92, lossless: bool = False, meta: Metadata | None = None
) -> bytes:
    """WebP from RGB(A) (H, W, 3 or 4) uint8 pixels, lossy at ``quality`` or lossless, with the
    colour profile, EXIF and XMP of ``meta`` (WebP has no field for resolution)."""
    return _encode_pillow(pixels, "WEBP", meta, quality=quality, lossless=lossless, method=4)


# The most pixels a side each format can hold (libjpeg-turbo's and libwebp's limits).
MAX_SIDE = {"JPEG": 65_500, "WEBP": 16_383}
# JPEG carries EXIF and XMP in one APP1 segment each, of at most 64 KiB: its length field's
# 65 535 less the field itself, and for XMP its namespace header. Larger blocks (Photoshop's
# document history in XMP often is) are left out of a JPEG rather than fail the photo.
JPEG_MAX_EXIF = 65_533
JPEG_MAX_XMP = 65_533 - len(b"http://ns.adobe.com/xap/1.0/\x00")


def _encode_pillow(pixels: np.ndarray, fmt: str, meta: Metadata | None, **options: object) -> bytes:
    """Raises ValueError when the picture does not fit the format; Pillow reports some of
    these as OSError, which the daemon must not take for a disk failure."""
    height, width = pixels.shape[:2]
    if max(width, height) > MAX_SIDE[fmt]:
        raise ValueError(
            f"{width}×{height} pixels do not fit {fmt}: it holds at most {MAX_SIDE[fmt]} a side"
        )
    meta = meta or Metadata()
    fields: dict[str, object] = {}
    if meta.dpi is not None and fmt == "JPEG":
        fields["dpi"] = meta.dpi
    if meta.icc is not None:
        fields["icc_profile"] = meta.icc
    jpeg = fmt == "JPEG"
    if meta.exif is not None and not (jpeg and len(meta.exif) > JPEG_MAX_EXIF):
        fields["exif"] = meta.exif
    if meta.xmp is not None and not (jpeg and len(meta.xmp) > JPEG_MAX_XMP):
        fields["xmp"] = meta.xmp
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options, **fields)
    return buffer.getvalue()


def one_line(exc: Exception) -> str:
    """A decoder's message on one line: libheif's end in blank lines, which would split a text
    log's record and an error sidecar's reason."""
    return " ".join(str(exc).split())
