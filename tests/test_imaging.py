"""Decoding every input kind the product promises, and refusing the rest with a reason."""

from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from hotfolder import imaging, png
from hotfolder.jobs import ImageError, Reason

from . import corpus


@pytest.fixture
def photo(photos: dict[str, np.ndarray]) -> np.ndarray:
    return photos["coffee"]  # 600 wide, 400 high


def assert_close(got: np.ndarray, expected: np.ndarray, tolerance: float) -> None:
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected.astype(int)).mean() <= tolerance


@pytest.mark.parametrize(
    ("fmt", "options", "tolerance"),
    [
        ("JPEG", {"quality": 95}, 3.0),
        ("PNG", {}, 0),
        ("WEBP", {"lossless": True}, 0),
        ("BMP", {}, 0),
        ("TIFF", {}, 0),
    ],
)
def test_formats_decode_by_content(
    photo: np.ndarray, fmt: str, options: dict[str, object], tolerance: float
) -> None:
    data = corpus.encoded(Image.fromarray(photo), fmt, **options)
    picture = imaging.decode(data)
    assert picture.alpha is None
    assert picture.rgb.dtype == np.uint8
    assert_close(picture.rgb, photo, tolerance)


def test_extension_is_ignored(photo: np.ndarray, tmp_path: Path) -> None:
    path = corpus.write(tmp_path, "really-a-png.jpg", corpus.png(photo))
    picture = imaging.decode(imaging.read_file(path))
    assert np.array_equal(picture.rgb, photo)


def test_grayscale_becomes_rgb(photo: np.ndarray) -> None:
    gray = np.asarray(Image.fromarray(photo).convert("L"))
    for data in (corpus.png(gray), corpus.jpeg(gray, quality=100)):
        picture = imaging.decode(data)
        assert picture.rgb.shape == (*gray.shape, 3)
        assert_close(picture.rgb[:, :, 1], gray, 1.0)


def test_sixteen_bit_gray_and_rgb(photo: np.ndarray) -> None:
    gray16 = np.asarray(Image.fromarray(photo).convert("L")).astype(np.uint16) * 257
    picture = imaging.decode(corpus.encoded(Image.fromarray(gray16), "PNG"))
    assert_close(picture.rgb[:, :, 0], (gray16 // 257).astype(np.uint8), 0)
    import cv2

    ok, rgb16 = cv2.imencode(".png", cv2.cvtColor(photo, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
    assert ok
    picture = imaging.decode(rgb16.tobytes())
    assert_close(picture.rgb, photo, 0)


def test_palette_with_transparency_keeps_alpha(photo: np.ndarray) -> None:
    palette = Image.fromarray(photo).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    transparent_index = int(np.asarray(palette)[0, 0])
    picture = imaging.decode(corpus.encoded(palette, "PNG", transparency=transparent_index))
    assert picture.alpha is not None
    assert picture.alpha[0, 0] == 0
    assert (picture.alpha == 255).mean() > 0.5


def test_rgba_input_keeps_alpha(photo: np.ndarray) -> None:
    alpha = np.zeros(photo.shape[:2], np.uint8)
    alpha[100:300, 200:400] = 255
    rgba = np.dstack((photo, alpha))
    for data in (corpus.png(rgba), corpus.encoded(Image.fromarray(rgba), "WEBP", lossless=True)):
        picture = imaging.decode(data)
        assert picture.alpha is not None
        assert np.array_equal(picture.alpha, alpha)
        assert np.array_equal(picture.rgb[alpha > 0], photo[alpha > 0])


def test_cmyk_jpeg_becomes_rgb(photo: np.ndarray) -> None:
    cmyk = Image.fromarray(photo).convert("CMYK")
    picture = imaging.decode(corpus.encoded(cmyk, "JPEG", quality=95))
    assert_close(picture.rgb, np.asarray(cmyk.convert("RGB")), 3.0)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(photo: np.ndarray, orientation: int) -> None:
    # Store the photo the way a camera would for this orientation, then expect it upright.
    stored = {
        1: photo,
        2: photo[:, ::-1],
        3: photo[::-1, ::-1],
        4: photo[::-1],
        5: photo.swapaxes(0, 1),  # transpose
        6: np.rot90(photo, k=1),  # the camera was turned 90° clockwise
        7: photo[::-1, ::-1].swapaxes(0, 1),  # transverse
        8: np.rot90(photo, k=-1),
    }[orientation]
    data = corpus.exif_rotated_jpeg(np.ascontiguousarray(stored), orientation)
    picture = imaging.decode(data)
    assert picture.size == (600, 400)
    assert_close(picture.rgb, photo, 4.0)
    # Pillow's own exif_transpose agrees.
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert_close(picture.rgb, np.asarray(upright), 1.0)


def test_pixel_cap_is_checked_from_the_header() -> None:
    with pytest.raises(ImageError, match=r"100000×100000 = 10000\.0 MP") as caught:
        imaging.decode(corpus.png_claiming(100_000, 100_000))
    assert caught.value.reason == Reason.TOO_MANY_PIXELS


def test_configurable_pixel_cap(photo: np.ndarray) -> None:
    with pytest.raises(ImageError) as caught:
        imaging.decode(corpus.png(photo), max_pixels=200_000)
    assert caught.value.reason == Reason.TOO_MANY_PIXELS


@pytest.mark.parametrize(
    ("make", "reason", "words"),
    [
        (lambda p: b"", Reason.EMPTY, "empty"),
        (corpus.truncated_jpeg, Reason.CORRUPT, "truncated"),
        (lambda p: b"hello, this is not a photo\n" * 20, Reason.UNSUPPORTED, "not a JPEG"),
        (lambda p: corpus.png(p)[:60], Reason.CORRUPT, "cannot be decoded|damaged"),
        (lambda p: corpus.encoded(Image.fromarray(p), "GIF"), Reason.UNSUPPORTED, "not a JPEG"),
    ],
    ids=["empty", "truncated-jpeg", "text", "truncated-png", "gif"],
)
def test_broken_input_is_a_clear_error(
    photo: np.ndarray, make: object, reason: Reason, words: str
) -> None:
    with pytest.raises(ImageError, match=words) as caught:
        imaging.decode(make(photo))  # type: ignore[operator]
    assert caught.value.reason == reason


def test_animated_webp_is_refused(photo: np.ndarray) -> None:
    frames = [Image.fromarray(photo), Image.fromarray(photo[::-1].copy())]
    data = corpus.encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError, match="2 frames") as caught:
        imaging.decode(data)
    assert caught.value.reason == Reason.UNSUPPORTED


def test_read_file_refuses_symlinks(tmp_path: Path) -> None:
    link = tmp_path / "passwd.jpg"
    link.symlink_to("/etc/passwd")
    with pytest.raises(ImageError, match="symbolic link") as caught:
        imaging.read_file(link)
    assert caught.value.reason == Reason.NOT_A_FILE


def test_read_file_refuses_fifos_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        imaging.read_file(fifo)


def test_read_file_refuses_folders(tmp_path: Path) -> None:
    folder = tmp_path / "x.jpg"
    folder.mkdir()
    with pytest.raises(ImageError, match="not a regular file"):
        imaging.read_file(folder)


def test_read_file_byte_cap_and_empty(tmp_path: Path) -> None:
    big = corpus.write(tmp_path, "big.jpg", b"\xff" * 2000)
    with pytest.raises(ImageError, match="2000 bytes, over the limit of 1000") as caught:
        imaging.read_file(big, max_bytes=1000)
    assert caught.value.reason == Reason.TOO_LARGE
    with pytest.raises(ImageError, match="empty"):
        imaging.read_file(corpus.write(tmp_path, "zero.jpg", b""))


@pytest.mark.parametrize("compression", ["fast", 0, 1, 6, 9])
def test_png_round_trips_through_pillow_and_opencv(
    photo: np.ndarray, compression: int | str
) -> None:
    alpha = np.linspace(0, 255, photo.shape[1], dtype=np.uint8)[None].repeat(photo.shape[0], 0)
    rgba = np.dstack((photo, alpha))
    for pixels, mode in ((rgba, "RGBA"), (photo, "RGB"), (alpha, "L")):
        encoded = imaging.encode_png(pixels, compression)
        back = Image.open(io.BytesIO(encoded))
        back.verify()  # chunk CRCs and structure
        back = Image.open(io.BytesIO(encoded))
        assert back.mode == mode
        assert np.array_equal(np.asarray(back), pixels)
        by_opencv = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED)
        if pixels.ndim == 3:
            code = cv2.COLOR_BGRA2RGBA if pixels.shape[2] == 4 else cv2.COLOR_BGR2RGB
            by_opencv = cv2.cvtColor(by_opencv, code)
        assert np.array_equal(by_opencv, pixels)


@pytest.mark.parametrize(("height", "width"), [(1, 1), (1, 7), (5, 1), (3, 333)])
def test_fast_png_odd_shapes_and_wrapping_differences(height: int, width: int) -> None:
    """Random bytes make the Up filter's differences wrap below zero and above 255."""
    pixels = np.random.default_rng(height * width).integers(0, 256, (height, width, 4), np.uint8)
    back = Image.open(io.BytesIO(png.encode(pixels)))
    assert np.array_equal(np.asarray(back), pixels)


def test_fast_png_compresses_like_zlib_and_refuses_what_png_cannot_hold(
    photo: np.ndarray,
) -> None:
    assert len(png.encode(photo)) < 1.1 * len(imaging.encode_png(photo, compression=1))
    bad = {
        "must be uint8": photo.astype(np.uint16),
        "cannot write pixels of shape": photo[:, :, :2],
        "an empty image": photo[:0],
    }
    for message, pixels in bad.items():
        with pytest.raises(ValueError, match=message):
            png.encode(pixels)


def test_jpeg_round_trip(photo: np.ndarray) -> None:
    decoded = imaging.decode(imaging.encode_jpeg(photo, quality=95))
    assert_close(decoded.rgb, photo, 3.0)


def zero_tail(data: bytes, kept: float) -> bytes:
    """A copy that set its final size first and stopped part-way: the rest is zeros."""
    cut = int(len(data) * kept)
    return data[:cut] + bytes(len(data) - cut)


def whole_files(photo: np.ndarray) -> dict[str, bytes]:
    image = Image.fromarray(photo)
    exif = Image.Exif()
    exif[0x010F] = "Camera"
    thumbnail = corpus.jpeg(photo[::8, ::8].copy())
    return {
        "jpeg": corpus.jpeg(photo),
        "progressive-jpeg": corpus.encoded(image, "JPEG", progressive=True, quality=90),
        "jpeg-with-restarts": corpus.encoded(image, "JPEG", restart_marker_rows=4),
        # An EXIF block holding a whole JPEG (its own end marker) ahead of the image data.
        "jpeg-with-thumbnail": corpus.jpeg(photo, exif=exif.tobytes() + thumbnail),
        "png": corpus.png(photo),
        "png-rgba": corpus.png(np.dstack((photo, photo[:, :, 0]))),
        "webp": corpus.encoded(image, "WEBP"),
        "webp-lossless": corpus.encoded(image, "WEBP", lossless=True),
        "bmp": corpus.encoded(image, "BMP"),
        "tiff": corpus.encoded(image, "TIFF"),
    }


def test_whole_files_do_not_look_incomplete(photo: np.ndarray) -> None:
    for name, data in whole_files(photo).items():
        assert imaging.looks_incomplete(data) is None, name
        # What follows the end does not matter: padding, a motion photo's video.
        assert imaging.looks_incomplete(data + bytes(4096)) is None, name
        assert imaging.looks_incomplete(data + b"\0\0\0\x18ftypmp42" * 100) is None, name
    assert imaging.looks_incomplete(b"hello, this is not a photo\n") is None  # not ours


@pytest.mark.parametrize(
    "name",
    ["jpeg", "progressive-jpeg", "jpeg-with-restarts", "jpeg-with-thumbnail", "png", "png-rgba",
     "webp", "webp-lossless"],
)  # fmt: skip
def test_cut_short_and_zero_filled_files_look_incomplete(photo: np.ndarray, name: str) -> None:
    data = whole_files(photo)[name]
    for length in [*range(1, 300, 7), *range(300, len(data), len(data) // 97), len(data) - 1]:
        problem = imaging.looks_incomplete(data[:length])
        assert problem is not None, f"{name} cut at {length} of {len(data)}"
        assert problem.reason == Reason.CORRUPT
        assert problem.message.startswith("is truncated: ")
    for kept in (0.01, 0.5, 0.9, 0.99):
        problem = imaging.looks_incomplete(zero_tail(data, kept))
        assert problem is not None, f"{name}, {kept:.0%} written, the rest zeros"
        assert problem.reason == Reason.CORRUPT
        assert "bytes are zeros: a copy that stopped part-way?" in problem.message


def test_a_zero_filled_jpeg_can_decode_without_error(photo: np.ndarray) -> None:
    """Why the end is checked: the decoder alone takes this copy, 90 % written, whose bottom
    rows are made up."""
    data = corpus.jpeg(photo, quality=95)
    partial = zero_tail(data, 0.9)
    picture = imaging.decode(partial).rgb.astype(int)
    whole = imaging.decode(data).rgb.astype(int)
    assert np.array_equal(picture[:300], whole[:300])
    assert np.abs(picture[-20:] - whole[-20:]).mean() > 20
    problem = imaging.looks_incomplete(partial)
    assert problem is not None
    assert "JPEG image data stops before its end marker (EOI)" in problem.message


def test_empty_and_all_zero_files_look_incomplete() -> None:
    for data, words in ((b"", "is empty (0 bytes)"), (bytes(5000), "holds only zero bytes")):
        problem = imaging.looks_incomplete(data)
        assert problem is not None
        assert problem.reason == Reason.EMPTY
        assert problem.message.startswith(words)


def test_a_file_written_end_first_looks_incomplete(photo: np.ndarray) -> None:
    """A copy that writes out of order (segmented downloads, SMB writes completing out of
    order) has its end before its start: no format begins with zeros, so it waits."""
    for name, data in whole_files(photo).items():
        end_first = bytes(len(data) // 2) + data[len(data) // 2 :]
        unfinished = imaging.looks_incomplete(end_first)
        assert unfinished is not None, name
        assert unfinished.reason == Reason.CORRUPT
        assert "starts with zero bytes" in unfinished.message


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's, as the daemon runs
def test_a_tiff_whose_next_frame_is_damaged_is_refused_as_corrupt() -> None:
    """Counting a TIFF's frames reads every frame's header; one pointing into pixel data (no
    dimensions there) is a corrupt file, not an error that escapes decoding (and would stop
    the daemon)."""
    pixels = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    data = bytearray(corpus.encoded(Image.fromarray(pixels), "TIFF"))
    first = int.from_bytes(data[4:8], "little")
    next_at = first + 2 + 12 * int.from_bytes(data[first : first + 2], "little")
    data[next_at : next_at + 4] = (191).to_bytes(4, "little")  # into the pixel data
    with pytest.raises(ImageError) as caught:
        imaging.decode(bytes(data))
    assert caught.value.reason == Reason.CORRUPT
