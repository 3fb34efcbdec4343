"""The U²-Net architectures and the ONNX importer, against the ONNX files themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from hotfolder import models
from hotfolder.cli import main
from hotfolder.models.onnx_import import OnnxImportError, import_onnx

from .conftest import WEIGHTS

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def rembg_input(photo: np.ndarray) -> np.ndarray:
    """The (1, 3, 320, 320) tensor rembg builds for its U²-Net sessions (session_base.normalize)."""
    small = Image.fromarray(photo).convert("RGB").resize((320, 320), Image.LANCZOS)
    pixels = np.asarray(small).astype(np.float64)
    x = (pixels / pixels.max() - MEAN) / STD
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def onnx_saliency(path: Path, batch: np.ndarray) -> np.ndarray:
    """The ONNX model's fused output, image by image (rembg's graph has a fixed batch of 1)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[None]})[0] for x in batch])


def test_u2netp_has_the_shipped_structure() -> None:
    model = models.build("u2netp")
    assert len(models.conv_layers(model)) == 119
    assert models.parameter_count(model) == 1_125_485


@pytest.mark.parametrize("batch_size", [1, 4])
def test_torch_model_matches_onnx_runtime_on_real_photos(
    rembg_onnx: Path, photos: dict[str, np.ndarray], batch_size: int
) -> None:
    batch = np.concatenate([rembg_input(p) for p in list(photos.values())[:batch_size]])
    expected = onnx_saliency(rembg_onnx, batch)
    model = models.load("u2netp", WEIGHTS)
    with torch.inference_mode():
        got = model(torch.from_numpy(batch)).numpy()
    assert got.shape == (batch_size, 1, 320, 320)
    assert np.abs(got - expected).max() <= 1e-4


def test_model_takes_any_batch_and_size() -> None:
    model = models.load("u2netp", WEIGHTS)
    with torch.inference_mode():
        out = model(torch.rand(3, 3, 200, 136))
    assert out.shape == (3, 1, 200, 136)
    assert out.min() >= 0
    assert out.max() <= 1


def test_import_reproduces_the_shipped_weights_bit_for_bit(
    rembg_onnx: Path, tmp_path: Path
) -> None:
    output = tmp_path / "u2netp.safetensors"
    assert main(["weights", "import", str(rembg_onnx), "--arch", "u2netp", "-o", str(output)]) == 0
    assert output.read_bytes() == WEIGHTS.read_bytes()


# rembg's ONNX files were made with PyTorch's TorchScript exporter; the tests use it on purpose.
legacy_onnx_export = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@legacy_onnx_export
def test_import_handles_full_u2net(tmp_path: Path) -> None:
    """rembg's u2net.onnx has the same blocks, wider: checked on one made from random weights."""
    torch.manual_seed(0)
    original = models.build("u2net").eval()
    onnx_path = tmp_path / "u2net.onnx"
    x = torch.rand(1, 3, 64, 64)
    torch.onnx.export(original, (x,), str(onnx_path), dynamo=False, opset_version=11)
    weights = tmp_path / "u2net.safetensors"
    metadata = import_onnx(onnx_path, "u2net", weights)
    assert metadata["arch"] == "u2net"
    state = load_file(str(weights))
    assert state.keys() == original.state_dict().keys()
    for name, tensor in original.state_dict().items():
        assert torch.equal(state[name], tensor), name
    imported = models.load("u2net", weights)
    with torch.inference_mode():
        got = imported(x).numpy()
    assert np.abs(got - onnx_saliency(onnx_path, x.numpy())).max() <= 1e-4


@legacy_onnx_export
def test_import_refuses_an_onnx_of_another_architecture(tmp_path: Path) -> None:
    onnx_path = tmp_path / "other.onnx"
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 1))
    torch.onnx.export(other.eval(), (torch.rand(1, 3, 32, 32),), str(onnx_path), dynamo=False)
    with pytest.raises(
        OnnxImportError, match="not a u2netp model: it has 2 convolutions, u2netp has 119"
    ):
        import_onnx(onnx_path, "u2netp", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_import_refuses_u2netp_weights_for_u2net(rembg_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(
        OnnxImportError,
        match=r"convolution 1 \(encoder.0.encoder.0.conv\) should have weight \(32, 64, 3, 3\)",
    ):
        import_onnx(rembg_onnx, "u2net", tmp_path / "out.safetensors")


def test_import_of_a_file_that_is_not_onnx_is_a_usage_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"\x00garbage" * 10)
    assert (
        main(["weights", "import", str(junk), "--arch", "u2netp", "-o", str(tmp_path / "w")]) == 2
    )
    assert "not a readable ONNX model" in caplog.text


def test_loading_weights_never_unpickles(tmp_path: Path) -> None:
    pickled = tmp_path / "u2netp.safetensors"
    torch.save(models.build("u2netp").state_dict(), pickled)
    with pytest.raises(models.WeightsError, match="not a readable safetensors file"):
        models.load("u2netp", pickled)


def test_weights_of_the_wrong_architecture_are_refused_in_a_line_that_names_the_fit() -> None:
    with pytest.raises(models.WeightsError, match="does not fit model 'u2net'") as refused:
        models.load("u2net", WEIGHTS)
    message = str(refused.value)
    # One line an operator can act on, not PyTorch's list of every tensor.
    assert "\n" not in message, message
    assert len(message) < 600, message
    assert "tensors of other shapes (first: " in message
    assert message.endswith("they fit model 'u2netp': set model.name: u2netp")


def test_weights_missing_a_tensor_are_refused(tmp_path: Path) -> None:
    state = models.build("u2netp").state_dict()
    del state["outconv.bias"]
    trimmed = tmp_path / "trimmed.safetensors"
    save_file(state, str(trimmed))
    with pytest.raises(models.WeightsError, match=r"1 tensors missing \(first: outconv.bias\)$"):
        models.load("u2netp", trimmed)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_weights_of_integers_or_booleans_are_refused(tmp_path: Path, dtype: torch.dtype) -> None:
    # PyTorch's loading would cast them to float silently and the model would matte garbage.
    state = {name: t.to(dtype) for name, t in load_file(str(WEIGHTS)).items()}
    retyped = tmp_path / "retyped.safetensors"
    save_file(state, str(retyped))
    with pytest.raises(models.WeightsError, match=r"tensors of other types \(first: .* is torch"):
        models.load("u2netp", retyped)


def test_weights_in_half_precision_load_as_the_same_numbers(tmp_path: Path) -> None:
    state = {name: t.half() for name, t in load_file(str(WEIGHTS)).items()}
    halved = tmp_path / "halved.safetensors"
    save_file(state, str(halved))
    loaded = models.load("u2netp", halved).state_dict()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor.float()), name
