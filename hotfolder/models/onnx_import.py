"""Convert rembg-style U²-Net ONNX files into safetensors for :mod:`hotfolder.models`.

rembg's ``u2net*.onnx`` files were exported from PyTorch with batch-norm folded into the
convolutions, so the trained weights are exactly the ``Conv`` initializers, in graph order.
The importer pairs them one by one with the architecture's convolutions (registered in forward
order), checks every shape, and refuses anything that does not line up.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from hotfolder.models import WeightsError, build, conv_layers
from hotfolder.publish import write_atomic


class OnnxImportError(WeightsError):
    """The ONNX file is not a model this architecture can take."""


def _onnx_convolutions(path: Path) -> list[tuple[np.ndarray, np.ndarray | None]]:
    try:
        import onnx
        from onnx import numpy_helper
    except ModuleNotFoundError as exc:  # an optional dependency: only importing needs it
        raise OnnxImportError(
            "importing ONNX weights needs the 'onnx' package: pip install 'hotfolder[import]'"
        ) from exc
    try:
        graph = onnx.load(str(path)).graph
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise OnnxImportError(f"{path}: not a readable ONNX model ({exc})") from exc
    initializers = {t.name: t for t in graph.initializer}

    def tensor(name: str) -> np.ndarray:
        if name not in initializers:
            raise OnnxImportError(f"{path}: Conv input {name!r} is not a stored weight")
        return numpy_helper.to_array(initializers[name])

    convs = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        bias = tensor(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        convs.append((tensor(node.input[1]), bias))
    return convs


def convert(onnx_path: Path, arch: str) -> dict[str, torch.Tensor]:
    """The state dict of ``arch`` filled from the ONNX file's convolutions."""
    model = build(arch)
    layers = conv_layers(model)
    found = _onnx_convolutions(onnx_path)
    if len(found) != len(layers):
        raise OnnxImportError(
            f"{onnx_path}: not a {arch} model: it has {len(found)} convolutions, "
            f"{arch} has {len(layers)}"
        )
    state: dict[str, torch.Tensor] = {}
    for index, ((name, conv), (weight, bias)) in enumerate(zip(layers, found, strict=True)):
        expected = tuple(conv.weight.shape)
        if weight.shape != expected or bias is None or bias.shape != (expected[0],):
            got = f"weight {weight.shape}, bias {None if bias is None else bias.shape}"
            raise OnnxImportError(
                f"{onnx_path}: not a {arch} model: convolution {index} ({name}) "
                f"should have weight {expected} and a bias, the file has {got}"
            )
        state[f"{name}.weight"] = torch.from_numpy(weight.astype(np.float32, copy=True))
        state[f"{name}.bias"] = torch.from_numpy(bias.astype(np.float32, copy=True))
    return state


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_onnx(
    onnx_path: Path, arch: str, output: Path, origin: dict[str, str] | None = None
) -> dict[str, str]:
    """Write ``output`` (safetensors) from ``onnx_path``; deterministic, so the same ONNX file
    always gives the same bytes. ``origin`` (where the ONNX file came from, e.g. its package)
    joins the provenance. Returns the provenance stored in the file.

    The file is written atomically with mode 0644 (a daemon running as another user reads it);
    an interrupted or failed write leaves no partial file. Raises :class:`WeightsError` when
    ``output`` cannot be written (a folder, below a file, no permission)."""
    state = convert(onnx_path, arch)
    provenance = {"arch": arch, "source_sha256": sha256_of(onnx_path)} | (origin or {})
    # One metadata key: safetensors writes several in a random order, which would make the
    # same import give different bytes from run to run.
    metadata = {"provenance": json.dumps(provenance, sort_keys=True)}
    try:
        write_atomic(output, save(state, metadata=metadata))
    except OSError as exc:
        raise WeightsError(f"{output}: cannot write ({exc.strerror or exc})") from None
    return provenance
