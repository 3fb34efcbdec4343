"""The model as an ONNX graph for ONNX Runtime: exported from its safetensors weights once,
checked against PyTorch, and kept in a cache folder, so that later starts load it without
importing PyTorch.

A cached graph is named by its architecture, the sha256 of the weights and :data:`FORMAT`: new
weights (or a changed export) get a graph of their own, never a stale one.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np

from hotfolder.publish import write_atomic

log = logging.getLogger(__name__)

# Raised whenever the exported graph changes, so caches made by older versions are not used.
FORMAT = 1
# ONNX opset of the export: supported by every ONNX Runtime since 1.12.
OPSET = 17
# The largest |Δ| of saliency (0–1) allowed between the graph on ONNX Runtime and the model on
# PyTorch, on a random input: the two differ only by float rounding (3e-6 measured for u2netp);
# a graph that misses it is refused.
TOLERANCE = 1e-4
CHECK_SIZE = 320  # models.INPUT_SIZE; the graph takes any batch size


class ExportError(Exception):
    """The model could not be exported, or its graph does not compute what PyTorch does."""


def weights_digest(weights: Path) -> str:
    """sha256 of the weights file, hex. Raises OSError when it cannot be read."""
    digest = hashlib.sha256()
    with weights.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cache_path(arch: str, weights: Path, cache: Path) -> Path:
    """Where the graph of ``arch`` with ``weights`` is kept in ``cache``."""
    return cache / f"{arch}-{weights_digest(weights)[:24]}-v{FORMAT}.onnx"


def onnx_model(arch: str, weights: Path, cache: Path, refresh: bool = False) -> bytes:
    """The serialized ONNX graph of ``arch`` with ``weights``: from ``cache`` when it is there
    (unless ``refresh``), else exported (importing PyTorch: seconds) and kept there. A cache
    that cannot be written costs only the export at each start, with a warning. Raises
    ExportError, and models.WeightsError for weights that do not load."""
    path = cache_path(arch, weights, cache)
    if not refresh:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            pass
        except OSError as exc:  # an unreadable cache only costs the export
            log.warning("cannot read the exported model in %s (%s)", cache, exc)
    log.info("exporting model %s for ONNX Runtime (once per weights file)", arch)
    data = export(arch, weights)
    try:
        write_atomic(path, data, mode=0o644)
    except OSError as exc:
        log.warning("cannot keep the exported model in %s (%s); it is exported again at each "
                    "start", cache, exc)  # fmt: skip
    return data


def export(arch: str, weights: Path) -> bytes:
    """``arch`` with ``weights`` as an ONNX graph (input ``input`` (N, 3, 320, 320) float32,
    output ``saliency`` (N, 1, 320, 320) float32), after checking that ONNX Runtime computes
    what PyTorch does within :data:`TOLERANCE`."""
    import torch

    from hotfolder import models

    try:
        model = models.load(arch, weights)
    except models.WeightsError as exc:
        raise ExportError(str(exc)) from exc
    example = torch.rand(1, 3, CHECK_SIZE, CHECK_SIZE, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter, and functions it uses, are deprecated in favour of
        # torch.export's exporter, which needs onnxscript; this one still exports U²-Net
        # exactly (checked below).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (example,), buffer,  # type: ignore[arg-type]  # file objects work too
            input_names=["input"], output_names=["saliency"],
            opset_version=OPSET, dynamic_axes={"input": {0: "batch"}, "saliency": {0: "batch"}},
            dynamo=False,
        )  # fmt: skip
    data = buffer.getvalue()
    with torch.inference_mode():
        expected = model(example).numpy()
    check(data, example.numpy(), expected)
    return data


def check(data: bytes, example: np.ndarray, expected: np.ndarray) -> None:
    """Raise ExportError unless the graph ``data`` gives ``expected`` for ``example``."""
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (got,) = session.run(["saliency"], {"input": example})
    worst = float(np.abs(got - expected).max()) if got.shape == expected.shape else np.inf
    if not worst <= TOLERANCE:
        raise ExportError(f"the exported model differs from PyTorch's by {worst:.2g}")
