"""What to render for each output of a job (cutout, mask, composite), and what to call it."""

from __future__ import annotations

import enum
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import ImageColor

from hotfolder import colour, foreground, imaging, names
from hotfolder.metadata import Metadata


class Kind(enum.StrEnum):
    CUTOUT = "cutout"  # RGBA: the photo with the background transparent
    MASK = "mask"  # 8-bit gray alpha matte
    COMPOSITE = "composite"  # the subject flattened onto a solid colour


FORMATS = {"png": ".png", "jpg": ".jpg"}
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
    quality: int = 92  # JPEG
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
        "colours", "metadata", "gps", "decontaminate"}  # fmt: skip


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
    if fmt not in FORMATS or (kind == Kind.CUTOUT and fmt != "png"):
        allowed_formats = "png" if kind == Kind.CUTOUT else ", ".join(FORMATS)
        raise RecipeError(f"{key}.format: {fmt!r} for {kind.value}; use {allowed_formats}")
    name = str(raw.get("name", ""))
    _check_template(name, key)
    background = _background(str(raw.get("background", "#ffffff")), fmt, key)
    quality, compression = raw.get("quality", 92), raw.get("compression", FAST_PNG)
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise RecipeError(f"{key}.quality: JPEG quality is 1–100, got {quality!r}")
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
    return Output(kind, fmt, name, background, quality, compression, clear, colours, metadata, gps,
                  decontaminate)  # fmt: skip


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
    outputs: tuple[Output, ...], picture: imaging.Picture, predicted: np.ndarray
) -> list[bytes]:
    """The encoded bytes of each output; the foreground colours are estimated once for all."""
    alpha = combined_alpha(predicted, picture)
    estimated: dict[tuple[bool, bool], np.ndarray] = {}

    def colours(output: Output) -> np.ndarray:
        source = output.colours == "source" and picture.source_rgb is not None
        key = (source, output.decontaminate and output.kind != Kind.MASK)
        if key not in estimated:
            rgb = picture.source_rgb if source and picture.source_rgb is not None else picture.rgb
            estimated[key] = foreground.estimate(rgb, alpha) if key[1] else rgb
        return estimated[key]

    return [_render(output, picture, alpha, colours(output)) for output in outputs]


def _render(output: Output, picture: imaging.Picture, alpha: np.ndarray, rgb: np.ndarray) -> bytes:
    source = output.colours == "source" and picture.source_rgb is not None
    if output.kind == Kind.MASK:
        meta = _metadata(output, picture, None)
        if output.format == "jpg":
            return imaging.encode_jpeg(alpha, output.quality, meta)
        return imaging.encode_png(alpha, output.compression, meta)
    meta = _metadata(output, picture, picture.meta.icc if source else colour.srgb_profile())
    if output.kind == Kind.CUTOUT or output.background is None:
        return imaging.encode_png(cutout(rgb, alpha, output.clear_transparent),
                                  output.compression, meta)  # fmt: skip
    flat = composite(rgb, alpha, output.background)
    if output.format == "jpg":
        return imaging.encode_jpeg(flat, output.quality, meta)
    return imaging.encode_png(flat, output.compression, meta)


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
