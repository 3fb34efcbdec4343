"""`hotfolder matte` and `hotfolder check` as a person runs them: real processes, real files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from . import corpus
from .conftest import ROOT, WEIGHTS


def hotfolder(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hotfolder", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def inbox(tmp_path: Path, photos: dict[str, np.ndarray]) -> Path:
    folder = tmp_path / "in"
    corpus.write(folder, "astronaut.jpg", corpus.jpeg(photos["astronaut"]))
    corpus.write(folder, "shoes/coffee.png", corpus.png(photos["coffee"]))
    corpus.write(folder, "shoes/notes.jpg", b"this is a shopping list, not a photo\n")
    corpus.write(folder, ".hidden.jpg", corpus.jpeg(photos["chelsea"]))
    return folder


def test_matte_writes_every_kind_and_reports_the_bad_file(inbox: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    kinds = ["--kind", "cutout", "--kind", "mask", "--kind", "composite"]
    result = hotfolder("matte", str(inbox), "-o", str(out), *kinds, "--background", "#00ff00")
    assert result.returncode == 1, result.stderr
    assert "notes.jpg: is not a JPEG, PNG, WebP, BMP, TIFF, HEIC/HEIF or AVIF" in result.stderr
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert written == [
        "astronaut.jpg", "astronaut.mask.png", "astronaut.png",
        "shoes", "shoes/coffee.jpg", "shoes/coffee.mask.png", "shoes/coffee.png",
    ]  # fmt: skip
    cutout_mode, cutout = corpus.load(out / "shoes/coffee.png")
    mask_mode, mask = corpus.load(out / "shoes/coffee.mask.png")
    _, composite = corpus.load(out / "shoes/coffee.jpg")
    assert (cutout_mode, mask_mode) == ("RGBA", "L")
    assert cutout.shape == (400, 600, 4)
    assert np.array_equal(cutout[:, :, 3], mask)
    original = corpus.load(inbox / "shoes/coffee.png")[1]
    visible, opaque = mask > 0, mask == 255
    # Opaque pixels are the photo's; the soft edge's carry the subject's estimated colour.
    assert np.array_equal(cutout[opaque, :3], original[opaque])
    assert not cutout[~visible].any()  # invisible pixels are cleared: smaller, faster PNGs
    background = mask == 0
    assert background.any()
    assert np.abs(composite[background].astype(int) - [0, 255, 0]).mean() < 8


def test_matte_exit_zero_when_every_file_works(inbox: Path, tmp_path: Path) -> None:
    (inbox / "shoes/notes.jpg").unlink()
    result = hotfolder("matte", str(inbox / "astronaut.jpg"), "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out/astronaut.png").is_file()
    assert "1 written" in result.stderr


def test_matte_never_overwrites_an_input_or_another_output(
    tmp_path: Path, photos: dict[str, np.ndarray]
) -> None:
    folder = tmp_path / "photos"
    corpus.write(folder, "cat.jpg", corpus.jpeg(photos["chelsea"]))
    corpus.write(folder, "cat.png", corpus.png(photos["chelsea"]))
    original = (folder / "cat.png").read_bytes()
    result = hotfolder("matte", str(folder), "-o", str(folder))
    assert result.returncode == 0, result.stderr
    assert (folder / "cat.png").read_bytes() == original
    # Each input gets a numbered output of its own instead of replacing an input or the other.
    assert sorted(p.name for p in folder.iterdir()) == ["cat-2.png", "cat-3.png", "cat.jpg",
                                                        "cat.png"]  # fmt: skip
    for name in ("cat-2.png", "cat-3.png"):
        mode, pixels = corpus.load(folder / name)
        assert mode == "RGBA"
        assert pixels.shape[:2] == photos["chelsea"].shape[:2]


def test_matte_reports_missing_inputs(tmp_path: Path) -> None:
    result = hotfolder("matte", str(tmp_path / "nothing.jpg"), "-o", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "nothing.jpg: no such file" in result.stderr


def test_check_accepts_the_default_config() -> None:
    result = hotfolder("check")
    assert result.returncode == 0, result.stderr
    assert "config: ok" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_check_refuses_cuda_without_a_gpu(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {{weights: {WEIGHTS}, device: cuda}}\n")
    result = hotfolder("check", "--config", str(config))
    assert result.returncode == 2
    assert "model.device is 'cuda' but no CUDA GPU is available" in result.stderr


def test_check_names_a_folder_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model: {{weights: {WEIGHTS}}}\n"
        "inboxes:\n"
        f"  - {{name: a, path: {tmp_path}/in, outbox: {blocker}/out, done: {tmp_path}/d,"
        f" errors: {tmp_path}/e}}\n"
    )
    result = hotfolder("check", "--config", str(config))
    assert result.returncode == 2
    assert "inboxes[0].outbox: cannot create" in result.stderr


def test_config_from_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("model: {nmae: u2netp}\n")
    result = subprocess.run(
        [sys.executable, "-m", "hotfolder", "check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"HOTFOLDER_CONFIG": str(config), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert result.returncode == 2
    assert "model.nmae: unknown key" in result.stderr


def test_matte_takes_any_name_and_skips_what_is_not_an_image(
    tmp_path: Path, photos: dict[str, np.ndarray]
) -> None:
    folder = tmp_path / "photos"
    latin1 = os.fsdecode(b"caf\xe9.jpg")  # as an old Windows or Samba client names it
    corpus.write(folder, latin1, corpus.jpeg(photos["chelsea"]))
    corpus.write(folder, "字" * 83 + ".jpg", corpus.jpeg(photos["coffee"]))  # 253 bytes
    corpus.write(folder, "README", b"photos from the spring shoot\n")
    out = tmp_path / "out"
    result = hotfolder("matte", str(folder), "-o", str(out), "--kind", "cutout", "--kind", "mask")
    assert result.returncode == 0, result.stderr
    written = sorted(os.fsencode(p.name) for p in out.iterdir())
    assert written[:2] == [b"caf\xe9.mask.png", b"caf\xe9.png"]
    assert len(written) == 4
    assert all(len(name) <= 255 for name in written)  # the long mask name is shortened
    assert "README: skipped" in result.stderr
    assert "2 written" in result.stderr
