"""What to render for each output of a job (cutout, mask, composite), and what to call it."""

from __future__ import annotations

import enum
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import ImageColor

from hotfolder import colour, foreground, framing, imaging, names
from hotfolder.jobs import ImageError, Reason
from hotfolder.metadata import Metadata


class Kind(enum.StrEnum):
    CUTOUT = "cutout"  # RGBA: the photo with the background transparent
    MASK = "mask"  # 8-bit gray alpha matte
    COMPOSITE = "composite"  # the subject flattened onto a solid colour


FORMATS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}
ALPHA_FORMATS = ("png", "webp")  # the formats a cutout (with transparency) can be
LOSSY_FORMATS = ("jpg", "webp")  # the formats max_bytes can shrink by lowering the quality
MAX_CANVAS_SIDE = 20_000  # pixels
DEFAULT_FORMAT = {Kind.CUTOUT: "png", Kind.MASK: "png", Kind.COMPOSITE: "jpg"}
DEFAULT_NAME = {
    Kind.CUTOUT: "{stem}.png",
    Kind.MASK: "{stem}.mask.png",
    Kind.COMPOSITE: "{stem}.jpg",
}
TEMPLATE_FIELDS = {"stem", "ext", "kind"}
# {ext} in a template is cut to this: a file named "a." + 253 letters has no real extension, and
# the name must still fit 255 bytes with the stem and a collision number.
MAX_EXT_BYTES = 32
MAX_TAG = "-999"  # the longest collision number (naming.MAX_SUFFIX)
FAST_PNG = "fast"
TRANSPARENT = "transparent"
# Which colours the pixels of an output are in: sRGB (tagged so), or the input's own, with its
# profile embedded (for a retoucher who works in Adobe RGB and wants no round trip).
COLOURS = ("srgb", "source")


class RecipeError(ValueError):
    """An output definition that cannot be rendered; the message names the key."""


@dataclass(frozen=True)
class Output:
    kind: Kind
    format: str = ""
    name: str = ""
    background: tuple[int, int, int] | None = (255, 255, 255)  # None: transparent
    quality: int = 92  # JPEG and lossy WebP
    # PNG: "fast" (ISA-L deflate: 7-9x faster to write than zlib, files about 10 % larger)
    # or a zlib level 0–9, for when size matters more than speed.
    compression: int | str = FAST_PNG
    # Cutouts: black out the colour of fully transparent pixels. Nobody sees it, and the PNG is
    # about a third smaller and faster to write; false keeps the photo's colours underneath.
    clear_transparent: bool = True
    colours: str = "srgb"  # one of COLOURS
    metadata: bool = False  # keep the input's EXIF and XMP (copyright, camera, capture time)
    gps: bool = False  # with metadata: keep where the photo was taken too
    # Cutouts and composites: estimate the subject's own colour in the soft edge, so the
    # backdrop does not show through it (foreground.py); false keeps the photo's pixels.
    decontaminate: bool = True
    crop: bool = False  # cut to the subject's box (framing.SUBJECT_ALPHA), widened by padding
    # The subject fitted into a canvas this size (width, height), centred; padding is then a
    # fraction of the canvas on each side, for crop one of the subject's longer side.
    canvas: tuple[int, int] | None = None
    padding: float = 0.0
    max_bytes: int | None = None  # JPEG/WebP: quality lowered until the file fits
    lossless: bool = False  # WebP

    def __post_init__(self) -> None:
        # Fill the per-kind defaults so every Output is complete once built.
        if not self.format:
            object.__setattr__(self, "format", DEFAULT_FORMAT[self.kind])
        if not self.name:
            default = DEFAULT_NAME[self.kind]
            if self.format != DEFAULT_FORMAT[self.kind]:
                default = default.rsplit(".", 1)[0] + FORMATS[self.format]
            object.__setattr__(self, "name", default)

    def filename(self, stem: str, ext: str, tag: str = "") -> str:
        """The output's file name for an input ``<stem><ext>``: control characters in the stem
        become ``_``, ``tag`` (a collision number such as ``-2``) follows the stem, and the stem
        is shortened on a character boundary so the name fits 255 bytes. Undecodable bytes of
        the input name (``surrogateescape``) are kept, so the output is named like its input."""
        stem = names.sanitize(stem)
        ext = names.fit(names.sanitize(ext.lstrip(".")), "", MAX_EXT_BYTES)
        kind = self.kind.value
        overhead = names.byte_length(self.name.format(stem="", ext=ext, kind=kind) + tag)
        short = names.fit(stem, "", names.NAME_MAX - overhead)
        return self.name.format(stem=short + tag, ext=ext, kind=kind)


def parse_colour(value: str) -> tuple[int, int, int]:
    """``#rrggbb``, ``#rgb``, ``r,g,b``, ``rgb(r, g, b)`` or a CSS colour name (``gray``,
    ``navy``, ``whitesmoke``: Pillow's ImageColor knows the 148 of CSS Color Module 4)."""
    text = value.strip().lower()
    try:
        if "," in text and not text.startswith(("rgb", "hs")):
            rgb = tuple(int(part) for part in text.split(","))
        else:
            rgb = ImageColor.getrgb(text)[:3]
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise RecipeError(
            f"{value!r} is not a colour; use #rrggbb, #rgb, r,g,b or a CSS name such as gray"
        )
    return rgb[0], rgb[1], rgb[2]


KEYS = {"kind", "format", "name", "background", "quality", "compression", "clear_transparent",
        "colours", "metadata", "gps", "decontaminate", "crop", "canvas", "padding", "max_bytes",
        "lossless"}  # fmt: skip


def parse_output(raw: Any, key: str) -> Output:
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{key}: expected a mapping such as {{kind: cutout}}")
    for name in raw:
        if name not in KEYS:
            raise RecipeError(f"{key}.{name}: unknown key; known: {', '.join(sorted(KEYS))}")
    try:
        kind = Kind(str(raw.get("kind")))
    except ValueError:
        kinds = ", ".join(k.value for k in Kind)
        raise RecipeError(f"{key}.kind: {raw.get('kind')!r} is not one of {kinds}") from None
    fmt = str(raw.get("format", DEFAULT_FORMAT[kind]))
    if fmt not in FORMATS or (kind == Kind.CUTOUT and fmt not in ALPHA_FORMATS):
        allowed_formats = ", ".join(ALPHA_FORMATS if kind == Kind.CUTOUT else FORMATS)
        raise RecipeError(f"{key}.format: {fmt!r} for {kind.value}; use {allowed_formats}")
    name = str(raw.get("name", ""))
    _check_template(name, key)
    background = _background(str(raw.get("background", "#ffffff")), fmt, key)
    quality, compression = raw.get("quality", 92), raw.get("compression", FAST_PNG)
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise RecipeError(f"{key}.quality: JPEG/WebP quality is 1–100, got {quality!r}")
    is_level = isinstance(compression, int) and not isinstance(compression, bool)
    if compression != FAST_PNG and not (is_level and 0 <= compression <= 9):
        raise RecipeError(
            f"{key}.compression: PNG compression is {FAST_PNG} or a level 0–9, got {compression!r}"
        )
    colours = str(raw.get("colours", "srgb"))
    if colours not in COLOURS:
        raise RecipeError(f"{key}.colours: {colours!r}; use {' or '.join(COLOURS)}")
    clear = _flag(raw, "clear_transparent", True, key)
    metadata, gps = _flag(raw, "metadata", False, key), _flag(raw, "gps", False, key)
    decontaminate = _flag(raw, "decontaminate", True, key)
    crop, lossless = _flag(raw, "crop", False, key), _flag(raw, "lossless", False, key)
    if lossless and fmt != "webp":
        raise RecipeError(f"{key}.lossless: only for format webp")
    canvas, padding = _canvas(raw.get("canvas"), fmt, key), raw.get("padding", 0.0)
    if isinstance(padding, bool) or not isinstance(padding, int | float) or not 0 <= padding < 0.5:
        raise RecipeError(f"{key}.padding: a fraction from 0 to below 0.5, got {padding!r}")
    max_bytes = raw.get("max_bytes")
    if max_bytes is not None and (fmt not in LOSSY_FORMATS or lossless):
        raise RecipeError(f"{key}.max_bytes: only for jpg and lossy webp")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                  or max_bytes < 1024):  # fmt: skip
        raise RecipeError(f"{key}.max_bytes: a number of bytes, at least 1024, got {max_bytes!r}")
    return Output(kind, fmt, name, background, quality, compression, clear, colours, metadata, gps,
                  decontaminate, crop, canvas, float(padding), max_bytes, lossless)  # fmt: skip


def _canvas(value: Any, fmt: str, key: str) -> tuple[int, int] | None:
    if value is None:
        return None
    largest = min(MAX_CANVAS_SIDE, imaging.MAX_SIDE["WEBP"]) if fmt == "webp" else MAX_CANVAS_SIDE
    sides = list(value) if isinstance(value, list | tuple) else []
    if len(sides) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                  and 1 <= v <= largest for v in sides):  # fmt: skip
        raise RecipeError(f"{key}.canvas: [width, height] in pixels, 1–{largest}, got {value!r}")
    return sides[0], sides[1]


def _flag(raw: Mapping[str, Any], name: str, default: bool, key: str) -> bool:
    value = raw.get(name, default)
    if not isinstance(value, bool):
        raise RecipeError(f"{key}.{name}: true or false, got {value!r}")
    return value


def _background(value: str, fmt: str, key: str) -> tuple[int, int, int] | None:
    """The colour, or None for ``transparent`` where the format has an alpha channel."""
    if value.strip().lower() == TRANSPARENT:
        if fmt == "jpg":
            raise RecipeError(f"{key}.background: JPEG has no transparency; pick a colour")
        return None
    try:
        return parse_colour(value)
    except RecipeError as exc:
        raise RecipeError(f"{key}.background: {exc}") from None


def _check_template(name: str, key: str) -> None:
    if not name:
        return
    try:
        parts = list(string.Formatter().parse(name))
    except ValueError as exc:
        raise RecipeError(f"{key}.name: {name!r} is not a template: {exc}") from None
    fields = {f for _, f, _, _ in parts if f is not None}
    specs = any(spec or conversion for _, f, spec, conversion in parts if f is not None)
    if "stem" not in fields or fields - TEMPLATE_FIELDS or "/" in name or "\\" in name or specs:
        raise RecipeError(
            f"{key}.name: {name!r} must contain {{stem}}, may use {{ext}} and {{kind}} (plain, "
            "without a format such as {stem:.3}), and may not contain a folder separator"
        )
    longest = names.byte_length(name.format(stem="", ext="x" * MAX_EXT_BYTES, kind="composite"))
    if longest + len(MAX_TAG) >= names.NAME_MAX - 16:
        raise RecipeError(f"{key}.name: {name!r} leaves no room for the photo's name in 255 bytes")


def check_unique_names(outputs: tuple[Output, ...], key: str) -> None:
    names = [o.filename("x", "jpg") for o in outputs]
    if len(set(names)) != len(names):
        raise RecipeError(f"{key}: two outputs would get the same file name; set distinct names")


def combined_alpha(predicted: np.ndarray, picture: imaging.Picture) -> np.ndarray:
    """The matte, also keeping whatever the input itself had already made transparent."""
    if picture.alpha is None:
        return predicted
    product: np.ndarray = predicted.astype(np.uint16) * picture.alpha
    return ((product + 127) // 255).astype(np.uint8)


def wants_source(outputs: tuple[Output, ...]) -> bool:
    """Whether decoding must keep the input's own colours beside the sRGB ones."""
    return any(o.colours == "source" for o in outputs)


def render(output: Output, picture: imaging.Picture, alpha: np.ndarray) -> bytes:
    """The encoded bytes of one output for a picture and its predicted alpha."""
    return render_all((output,), picture, alpha)[0]


def render_all(
    outputs: tuple[Output, ...],
    picture: imaging.Picture,
    predicted: np.ndarray,
    lowered: dict[str, int] | None = None,
) -> list[bytes]:
    """The encoded bytes of each output; the foreground colours are estimated once for all.
    ``lowered`` receives, by output name template, the quality an output with ``max_bytes``
    was written at when it had to be lowered. Raises ImageError when an output cannot be
    made (no subject to frame, a size that no quality meets)."""
    alpha = combined_alpha(predicted, picture)
    estimated: dict[tuple[bool, bool], np.ndarray] = {}

    def colours(output: Output) -> np.ndarray:
        source = output.colours == "source" and picture.source_rgb is not None
        key = (source, output.decontaminate and output.kind != Kind.MASK)
        if key not in estimated:
            rgb = picture.source_rgb if source and picture.source_rgb is not None else picture.rgb
            estimated[key] = foreground.estimate(rgb, alpha) if key[1] else rgb
        return estimated[key]

    rendered = []
    for output in outputs:
        data, quality = _render(output, picture, alpha, colours(output))
        if quality != output.quality and lowered is not None:
            lowered[output.name] = quality
        rendered.append(data)
    return rendered


def _render(
    output: Output, picture: imaging.Picture, alpha: np.ndarray, rgb: np.ndarray
) -> tuple[bytes, int]:
    """(the output's bytes, the quality it was written at)."""
    source = output.colours == "source" and picture.source_rgb is not None
    background = _background_for(output, picture.meta.icc if source else None)
    if output.canvas is not None:
        rgb, alpha = framing.on_canvas(rgb, alpha, output.canvas, output.padding,
                                       background)  # fmt: skip
    elif output.crop:
        rgb, alpha = framing.crop(rgb, alpha, output.padding)
    if output.kind == Kind.MASK:
        return _encode(output, alpha, _metadata(output, picture, None))
    meta = _metadata(output, picture, picture.meta.icc if source else colour.srgb_profile())
    if output.kind == Kind.CUTOUT or background is None:
        return _encode(output, cutout(rgb, alpha, output.clear_transparent), meta)
    return _encode(output, composite(rgb, alpha, background), meta)


def _background_for(output: Output, icc: bytes | None) -> tuple[int, int, int] | None:
    """The output's background (given in sRGB) in the colours its pixels are in: those of
    ``icc`` when the output keeps the photo's own, else sRGB. A profile littleCMS cannot
    convert into keeps the numbers as given."""
    if output.background is None or icc is None:
        return output.background
    try:
        return colour.from_srgb(output.background, icc)
    except colour.ProfileError:
        return output.background


def _encode(output: Output, pixels: np.ndarray, meta: Metadata) -> tuple[bytes, int]:
    if output.format == "png":
        return imaging.encode_png(pixels, output.compression, meta), output.quality

    def encode(quality: int) -> bytes:
        if output.format == "jpg":
            return imaging.encode_jpeg(pixels, quality, meta)
        return imaging.encode_webp(pixels, quality, output.lossless, meta)

    return _fit(encode, output.quality, output.max_bytes)


def _fit(encode: Callable[[int], bytes], quality: int, max_bytes: int | None) -> tuple[bytes, int]:
    """The bytes at ``quality``, or at the highest lower quality whose file fits ``max_bytes``
    (file size falls as quality does, so a binary search finds it in at most 7 encodings)."""
    data = encode(quality)
    if max_bytes is None or len(data) <= max_bytes:
        return data, quality
    best: tuple[bytes, int] | None = None
    low, high = 1, quality - 1
    while low <= high:
        middle = (low + high) // 2
        attempt = encode(middle)
        if len(attempt) <= max_bytes:
            best, low = (attempt, middle), middle + 1
        else:
            high = middle - 1
    if best is None:
        raise ImageError(Reason.TOO_BIG_OUTPUT,
                         f"does not fit {max_bytes} bytes even at quality 1")  # fmt: skip
    return best


def _metadata(output: Output, picture: imaging.Picture, icc: bytes | None) -> Metadata:
    """What the output file says about itself: the input's resolution always; the profile its
    pixels are in (none for a mask, which holds no colours); EXIF and XMP if asked."""
    if not output.metadata:
        return Metadata(dpi=picture.meta.dpi, icc=icc)
    kept = picture.meta if output.gps else picture.meta.without_gps()
    return Metadata(dpi=picture.meta.dpi, icc=icc, exif=kept.exif, xmp=kept.xmp)


def cutout(rgb: np.ndarray, alpha: np.ndarray, clear_transparent: bool) -> np.ndarray:
    """RGBA pixels: the photo with ``alpha`` as its alpha channel, its colour zeroed where the
    alpha is 0 if asked. OpenCV's masked AND and channel merge do in 1.4–2 ms on a 1 MP photo
    what NumPy's boolean indexing and dstack take 15–20 ms for."""
    if clear_transparent:
        rgb = cv2.bitwise_and(rgb, rgb, mask=alpha)
    rgba: np.ndarray = cv2.merge((*cv2.split(rgb), alpha))
    return rgba


def composite(rgb: np.ndarray, alpha: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """The photo over a solid colour, weighted by ``alpha``. OpenCV blends 1 MP in 8–10 ms, NumPy
    in 13–20."""
    weight = alpha.astype(np.float32) * np.float32(1 / 255)
    colour = np.empty_like(rgb)
    colour[:] = background
    flat: np.ndarray = cv2.blendLinear(rgb, colour, weight, 1 - weight)
    return flat
