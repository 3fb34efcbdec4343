"""Faithful pictures: colour profiles, camera formats (MPO, HEIC, AVIF), resolution and metadata
come through to the outputs. Every input is built here: littleCMS (Pillow's ImageCms) converts
into the profiles of tests/profiles.py, pillow-heif writes HEIC."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from PIL import Image, ImageCms, PngImagePlugin

from hotfolder import imaging, recipes
from hotfolder.jobs import ImageError, Reason

from . import profiles
from .conftest import ROOT
from .test_cli import hotfolder

RED = (220, 20, 30)  # a product's red, in sRGB
BLOCK = (slice(20, 60), slice(30, 90))
CENTRE = (40, 60)
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def red_block() -> np.ndarray:
    """A red block on grey, sRGB, 80×120."""
    rgb = np.full((80, 120, 3), 128, np.uint8)
    rgb[BLOCK] = RED
    return rgb


def in_profile(rgb: np.ndarray, icc: bytes) -> Image.Image:
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    converted = ImageCms.profileToProfile(Image.fromarray(rgb), SRGB, profile)
    assert converted is not None
    return converted


def saved(image: Image.Image, fmt: str, **options: object) -> bytes:
    if fmt == "HEIF":  # Pillow writes HEIC through pillow-heif, which hotfolder registers
        pillow_heif.register_heif_opener()  # only when it first reads one
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def littlecms_srgb(data: bytes) -> np.ndarray:
    """What littleCMS itself makes of a file's pixels through its embedded profile."""
    image = Image.open(io.BytesIO(data))
    profile = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
    converted = ImageCms.profileToProfile(image, profile, SRGB, outputMode="RGB")
    assert converted is not None
    return np.asarray(converted)


def opaque(picture: imaging.Picture) -> np.ndarray:
    return np.full(picture.rgb.shape[:2], 255, np.uint8)


def is_tagged_srgb(data: bytes) -> bool:
    image = Image.open(io.BytesIO(data))
    if "srgb" in image.info:  # PNG's sRGB chunk
        return True
    icc = image.info.get("icc_profile")
    return icc is not None and "sRGB" in ImageCms.getProfileDescription(
        ImageCms.ImageCmsProfile(io.BytesIO(icc))
    )


@pytest.mark.parametrize("space", list(profiles.SPACES))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_profiled_inputs_are_converted_to_srgb_and_outputs_tagged(space: str, fmt: str) -> None:
    icc = profiles.rgb_profile(space)
    data = saved(in_profile(red_block(), icc), fmt, icc_profile=icc, quality=95)
    expected = littlecms_srgb(data)
    picture = imaging.decode(data)
    assert np.abs(picture.rgb.astype(int) - expected).max() <= 3
    assert np.abs(picture.rgb[CENTRE].astype(int) - RED).max() <= 4
    for output in (recipes.Output(recipes.Kind.COMPOSITE), recipes.Output(recipes.Kind.CUTOUT)):
        written = recipes.render(output, picture, opaque(picture))
        assert is_tagged_srgb(written)
        pixels = np.asarray(Image.open(io.BytesIO(written)).convert("RGB")).astype(int)
        assert np.abs(pixels[CENTRE] - expected[CENTRE]).max() <= 3


def test_source_colours_keep_the_profile_in_every_output() -> None:
    icc = profiles.rgb_profile("Adobe RGB (1998)")
    stored = in_profile(red_block(), icc)
    picture = imaging.decode(saved(stored, "PNG", icc_profile=icc), keep_source=True)
    assert picture.source_rgb is not None
    for kind, fmt in [("cutout", "png"), ("composite", "jpg"), ("composite", "png")]:
        output = recipes.parse_output({"kind": kind, "format": fmt, "colours": "source"}, "o")
        written = Image.open(io.BytesIO(recipes.render(output, picture, opaque(picture))))
        assert written.info["icc_profile"] == icc
        pixels = np.asarray(written.convert("RGB")).astype(int)
        assert np.abs(pixels[CENTRE] - np.asarray(stored)[CENTRE]).max() <= 2
    # The model sees sRGB either way.
    assert np.abs(picture.rgb[CENTRE].astype(int) - RED).max() <= 4


def test_cmyk_jpeg_is_converted_through_its_profile() -> None:
    icc = profiles.cmyk_profile()
    cmyk = Image.fromarray(red_block()).convert("CMYK")
    data = saved(cmyk, "JPEG", icc_profile=icc, quality=95)
    expected = littlecms_srgb(data)
    picture = imaging.decode(data)
    assert np.abs(picture.rgb.astype(int) - expected).max() <= 3
    # Pillow's own conversion ignores the inks and gives a much stronger red.
    naive = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert np.abs(naive[CENTRE] - expected[CENTRE]).max() > 10


def test_camera_jpeg_with_a_preview_uses_the_primary_picture() -> None:
    primary = Image.fromarray(red_block())
    preview = Image.new("RGB", (60, 40), (0, 0, 255))
    data = saved(primary, "MPO", save_all=True, append_images=[preview], quality=95)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    picture = imaging.decode(data)
    assert picture.size == (120, 80)
    assert np.abs(picture.rgb[CENTRE].astype(int) - RED).max() <= 4


def exif(orientation: int = 1, gps: bool = True) -> Image.Exif:
    tags = Image.Exif()
    tags[0x0112] = orientation
    tags[0x8298] = "(c) Example Shop"  # Copyright
    tags[0x010F] = "ExampleCam"  # Make
    tags.get_ifd(0x8769)[0x9003] = "2025:05:01 10:00:00"  # DateTimeOriginal
    if gps:
        tags.get_ifd(0x8825)[1] = "N"
        tags.get_ifd(0x8825)[2] = (52.0, 31.0, 12.0)
    return tags


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heic_and_avif_decode_upright_in_srgb(fmt: str) -> None:
    icc = profiles.rgb_profile("Display P3")
    stored = in_profile(red_block(), icc)
    data = saved(stored, fmt, icc_profile=icc, exif=exif(orientation=6).tobytes(), quality=95)
    picture = imaging.decode(data)
    assert picture.size == (80, 120)  # turned upright
    upright_centre = (CENTRE[1], 80 - 1 - CENTRE[0])
    assert np.abs(picture.rgb[upright_centre].astype(int) - RED).max() <= 6
    with pytest.raises(ImageError) as refused:
        imaging.decode(data, max_pixels=5000)
    assert refused.value.reason == Reason.TOO_MANY_PIXELS


def test_the_primary_heic_picture_is_used_and_limits_come_from_its_header() -> None:
    primary = pillow_heif.from_pillow(Image.fromarray(red_block()))
    primary.add_from_pillow(Image.new("RGB", (4000, 3000), (0, 0, 255)))
    buffer = io.BytesIO()
    primary.save(buffer, quality=90)
    picture = imaging.decode(buffer.getvalue(), max_pixels=10_000)
    assert picture.size == (120, 80)


HEIF_ON_DEMAND = """
import sys
from pathlib import Path
from hotfolder import cli, imaging, matte, oneshot, onnxengine
from hotfolder.jobs import ImageError
imaging.decode(Path(sys.argv[1]).read_bytes())
try:
    imaging.decode(b"notes, not a photo")
except ImageError as exc:
    print(exc.reason.name)
print("pillow_heif" in sys.modules)
print(imaging.decode(Path(sys.argv[2]).read_bytes()).size)
"""


def test_heic_support_is_loaded_when_a_heic_is_first_met(tmp_path: Path) -> None:
    """A command's start does not pay for importing pillow-heif unless a HEIC comes."""
    jpeg, heic = tmp_path / "photo.jpg", tmp_path / "photo.heic"
    jpeg.write_bytes(saved(Image.fromarray(red_block()), "JPEG"))
    heic.write_bytes(saved(Image.fromarray(red_block()), "HEIF"))
    result = subprocess.run(
        [sys.executable, "-c", HEIF_ON_DEMAND, str(jpeg), str(heic)],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    assert result.stdout.split("\n")[:3] == ["UNSUPPORTED", "False", "(120, 80)"]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF"])
def test_resolution_is_kept_in_every_output(fmt: str) -> None:
    data = saved(Image.fromarray(red_block()), fmt, dpi=(300, 300))
    picture = imaging.decode(data)
    outputs = [recipes.Output(k, f) for k in recipes.Kind for f in ("png", "jpg")
               if not (k == recipes.Kind.CUTOUT and f == "jpg")]  # fmt: skip
    for output in outputs:
        written = Image.open(io.BytesIO(recipes.render(output, picture, opaque(picture))))
        assert written.info["dpi"] == pytest.approx((300, 300), abs=0.01), output
        if written.format == "JPEG":
            assert written.info["jfif_unit"] == 1  # dots per inch


def test_metadata_is_kept_when_asked_without_gps_and_upright() -> None:
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
           b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
           b'xmlns:exif="http://ns.adobe.com/exif/1.0/" xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
           b'xmlns:dc="http://purl.org/dc/elements/1.1/" exif:GPSLatitude="52,31.2N" '
           b'tiff:Orientation="6" dc:rights="(c) Example Shop"/>'
           b"</rdf:RDF></x:xmpmeta>")  # fmt: skip
    data = saved(Image.fromarray(red_block()), "JPEG", exif=exif(orientation=6), xmp=xmp)
    picture = imaging.decode(data)
    for fmt in ("png", "jpg"):
        plain = recipes.Output(recipes.Kind.COMPOSITE, fmt)
        written = Image.open(io.BytesIO(recipes.render(plain, picture, opaque(picture))))
        assert not written.getexif()
        assert "xmp" not in written.info
        assert "XML:com.adobe.xmp" not in written.info
        kept = recipes.parse_output({"kind": "composite", "format": fmt, "metadata": True}, "o")
        written = Image.open(io.BytesIO(recipes.render(kept, picture, opaque(picture))))
        tags = written.getexif()
        assert tags[0x8298] == "(c) Example Shop"
        assert tags[0x010F] == "ExampleCam"
        assert tags.get_ifd(0x8769)[0x9003] == "2025:05:01 10:00:00"
        assert tags[0x0112] == 1
        assert not tags.get_ifd(0x8825)
        packet = written.info.get("xmp") or written.info["XML:com.adobe.xmp"]
        text = packet.decode() if isinstance(packet, bytes) else packet
        assert "(c) Example Shop" in text
        assert "GPS" not in text
        assert re.search(r'Orientation="1"', text)
    with_gps = {"kind": "composite", "metadata": True, "gps": True}
    output = recipes.parse_output(with_gps, "o")
    written = Image.open(io.BytesIO(recipes.render(output, picture, opaque(picture))))
    assert written.getexif().get_ifd(0x8825)[1] == "N"


@pytest.mark.parametrize(
    ("name", "rgb"),
    [("gray", (128, 128, 128)), ("red", (255, 0, 0)), ("navy", (0, 0, 128)),
     ("WhiteSmoke", (245, 245, 245)), ("#0f0", (0, 255, 0)), ("10, 20, 30", (10, 20, 30))],
)  # fmt: skip
def test_css_colour_names(name: str, rgb: tuple[int, int, int]) -> None:
    assert recipes.parse_colour(name) == rgb


def test_transparent_background_where_the_format_allows() -> None:
    output = recipes.parse_output({"kind": "composite", "format": "png",
                                   "background": "transparent"}, "o")  # fmt: skip
    picture = imaging.decode(saved(Image.fromarray(red_block()), "PNG"))
    alpha = np.zeros(picture.rgb.shape[:2], np.uint8)
    alpha[BLOCK] = 255
    written = Image.open(io.BytesIO(recipes.render(output, picture, alpha)))
    assert written.mode == "RGBA"
    assert written.getpixel((0, 0))[3] == 0
    with pytest.raises(recipes.RecipeError, match="JPEG has no transparency"):
        recipes.parse_output({"kind": "composite", "background": "transparent"}, "o")
    with pytest.raises(recipes.RecipeError, match="not a colour"):
        recipes.parse_output({"kind": "composite", "background": "reddish"}, "o")


def test_matte_command_reads_an_iphone_photo(tmp_path: Path) -> None:
    """HEIC in Display P3 at 72 dpi with GPS, through the real model, to tagged sRGB outputs."""
    icc = profiles.rgb_profile("Display P3")
    rgb = np.full((240, 320, 3), 235, np.uint8)
    rgb[60:180, 100:220] = RED
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "IMG_0001.HEIC").write_bytes(
        saved(in_profile(rgb, icc), "HEIF", icc_profile=icc, exif=exif(), quality=95)
    )
    out = tmp_path / "out"
    result = hotfolder("matte", str(folder), "-o", str(out), "--kind", "cutout",
                       "--kind", "composite")  # fmt: skip
    assert result.returncode == 0, result.stderr
    for name in ("IMG_0001.png", "IMG_0001.jpg"):
        data = (out / name).read_bytes()
        assert is_tagged_srgb(data)
        written = Image.open(io.BytesIO(data))
        assert not written.getexif().get_ifd(0x8825)
        centre = np.asarray(written.convert("RGB"))[120, 160].astype(int)
        assert np.abs(centre - RED).max() <= 8


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heic_and_avif_being_copied_look_incomplete(fmt: str) -> None:
    """A file claimed while still arriving waits for its writer instead of being refused."""
    noise = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    data = saved(Image.fromarray(noise), fmt, quality=90)
    assert imaging.looks_incomplete(data) is None
    for cut in (len(data) // 2, 200, 12):
        unfinished = imaging.looks_incomplete(data[:cut])
        assert unfinished is not None, cut
        assert unfinished.reason == Reason.CORRUPT


def test_a_damaged_heics_reason_is_one_line() -> None:
    """libheif ends its messages in a newline: the reason goes into a text log's record and an
    error sidecar, so it is said on one line."""
    noise = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    data = saved(Image.fromarray(noise), "HEIF", quality=90)
    with pytest.raises(ImageError, match=r"^cannot be decoded: .*file bounds") as refused:
        imaging.decode(data[: len(data) // 2])
    assert refused.value.reason == Reason.CORRUPT
    assert str(refused.value) == str(refused.value).strip()
    assert "\n" not in str(refused.value)


def test_metadata_too_long_for_jpeg_is_left_out_of_the_jpeg_only() -> None:
    """Photoshop's XMP (its document history) often passes the 64 KiB a JPEG segment holds:
    the JPEG output is written without that packet, keeping the EXIF; a PNG keeps it all."""
    ancestors = "".join(f"<rdf:li>xmp.did:{i:060d}</rdf:li>" for i in range(1200))
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
           'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
           'xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/"><photoshop:DocumentAncestors>'
           f"<rdf:Bag>{ancestors}</rdf:Bag></photoshop:DocumentAncestors></rdf:Description>"
           "</rdf:RDF></x:xmpmeta>")  # fmt: skip
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp)
    data = saved(Image.fromarray(red_block()), "PNG", exif=exif(orientation=1), pnginfo=info)
    picture = imaging.decode(data)
    assert picture.meta.xmp is not None
    assert len(picture.meta.xmp) > 65_536
    for fmt in ("jpg", "png"):
        kept = recipes.parse_output({"kind": "composite", "format": fmt, "metadata": True}, "o")
        written = Image.open(io.BytesIO(recipes.render(kept, picture, opaque(picture))))
        assert written.getexif()[0x8298] == "(c) Example Shop"
        packet = written.info.get("xmp") or written.info.get("XML:com.adobe.xmp")
        assert (packet is None) == (fmt == "jpg")


def test_one_photos_xmp_cannot_spoil_the_next_ones() -> None:
    """XMP prefixes are kept by name for every packet written after; a packet that binds its
    own prefix to XML's reserved namespace (a parse error, dropped) must not make the next
    photo's ``xml:lang`` come out as invalid XML."""
    hostile = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/" '
               b'xmlns:bad="http://www.w3.org/XML/1998/namespace"/>')  # fmt: skip
    rights = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
              b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
              b'xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:rights><rdf:Alt>'
              b'<rdf:li xml:lang="x-default">(c) Example Shop</rdf:li></rdf:Alt></dc:rights>'
              b"</rdf:Description></rdf:RDF></x:xmpmeta>")  # fmt: skip
    first = imaging.decode(saved(Image.fromarray(red_block()), "JPEG", xmp=hostile))
    assert first.meta.xmp is None
    picture = imaging.decode(saved(Image.fromarray(red_block()), "JPEG", xmp=rights))
    kept = recipes.parse_output({"kind": "composite", "metadata": True}, "o")
    written = Image.open(io.BytesIO(recipes.render(kept, picture, opaque(picture))))
    packet = ET.fromstring(written.info["xmp"])
    (item,) = packet.iter("{http://www.w3.org/1999/02/22-rdf-syntax-ns#}li")
    assert item.get("{http://www.w3.org/XML/1998/namespace}lang") == "x-default"


@pytest.mark.parametrize("space", ["Adobe RGB (1998)", "ProPhoto RGB"])
def test_background_in_source_colours_is_the_colour_asked_for(space: str) -> None:
    """A composite in the photo's own colours gets its background in those colours too: a
    grey #808080 or a tan shows as that grey and tan in any colour-managed viewer."""
    icc = profiles.rgb_profile(space)
    picture = imaging.decode(saved(in_profile(red_block(), icc), "PNG", icc_profile=icc),
                             keep_source=True)  # fmt: skip
    nothing = np.zeros(picture.rgb.shape[:2], np.uint8)
    for background, rgb in [("#808080", (128, 128, 128)), ("#c89664", (200, 150, 100))]:
        keys = {"kind": "composite", "format": "png", "colours": "source", "background": background}
        written = recipes.render(recipes.parse_output(keys, "o"), picture, nothing)
        assert np.abs(littlecms_srgb(written)[0, 0].astype(int) - rgb).max() <= 2, background


def test_a_linear_profile_named_srgb_is_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Graphics and raw tools tag linear-light pictures with profiles named like sRGB ("sRGB
    linear", "sRGB-elle-V2-g10"): what a profile means is its colours, not its name."""
    linear = ((0.64, 0.33), (0.30, 0.60), (0.15, 0.06), (0.3127, 0.3290), 1.0)  # sRGB's, gamma 1
    monkeypatch.setitem(profiles.SPACES, "sRGB linear", linear)
    icc = profiles.rgb_profile("sRGB linear")
    data = saved(in_profile(red_block(), icc), "PNG", icc_profile=icc)
    picture = imaging.decode(data)
    assert np.abs(picture.rgb[CENTRE].astype(int) - RED).max() <= 2


def test_converted_pixels_are_writable_like_every_decoded_picture() -> None:
    """The model takes pixels as tensors without copying them; read-only ones (a view of
    Pillow's buffer) make PyTorch warn of undefined behaviour in the daemon's log."""
    icc = profiles.rgb_profile("Adobe RGB (1998)")
    picture = imaging.decode(saved(in_profile(red_block(), icc), "PNG", icc_profile=icc))
    assert picture.rgb.flags.writeable
    cmyk = saved(Image.fromarray(red_block()).convert("CMYK"), "JPEG",
                 icc_profile=profiles.cmyk_profile())  # fmt: skip
    assert imaging.decode(cmyk).rgb.flags.writeable


def test_heic_colours_signalled_without_a_profile_are_converted() -> None:
    """HEIC from most phones but the iPhone says its colours with code points (nclx: Display
    P3 primaries, sRGB's curve) instead of an ICC profile: they are converted all the same."""
    icc = profiles.rgb_profile("Display P3")
    stored = np.full((64, 64, 3), 0, np.uint8)
    stored[:] = np.asarray(in_profile(red_block(), icc))[CENTRE]
    buffer = io.BytesIO()
    pillow_heif.from_pillow(Image.fromarray(stored)).save(
        buffer, quality=95, color_primaries=12, transfer_characteristics=13,
        matrix_coefficients=6, full_range_flag=1,
    )  # fmt: skip
    picture = imaging.decode(buffer.getvalue())
    assert np.abs(picture.rgb[32, 32].astype(int) - RED).max() <= 4
