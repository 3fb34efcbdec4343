"""The ``int8-mixed`` form of U²-Net-P for ONNX Runtime on the CPU: its four costliest
convolutions in int8, everything else in fp32.

Built from the exported fp32 graph (:mod:`hotfolder.exported`) with ONNX Runtime's static
quantization in QDQ form: per-channel symmetric int8 weights, asymmetric uint8 activations.
The four convolutions hold 62 % of the model's multiply-adds; on an AVX2 CPU the form runs
1.3× faster than fp32, with mattes within 2/255 of fp32's (mean per image) and every
``hotfolder eval`` metric within 0.3 %. Quantizing more of the model, or with plain min–max
output ranges, costs more quality than it gains speed (the first stages and the side outputs
are sensitive).

The activation ranges are constants (:data:`RANGES`) measured once by
``bench/calibrate_int8.py``, so a build needs no calibration photos: the calibration ONNX
Runtime's API asks for sees one blank input, and every range it would measure is replaced by
ours. The graph is built once per weights file and kept next to the fp32 one. ``precision:
auto`` picks this form for the shipped weights on AVX2 and AVX-512 CPUs (:func:`suits`).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from hotfolder import exported

log = logging.getLogger(__name__)

# Raised whenever the built graph changes (ranges, nodes, options, metadata), so older caches
# are unused.
FORMAT = 2
PRECISION = "int8-mixed"
ARCH = "u2netp"  # the node names below are this model's
INPUT_SIZE = 320

# Per convolution (ONNX node name, as torch.onnx names u2netp's modules): the (min, max) of its
# input and of its output over the calibration photos, by bench/calibrate_int8.py. An output's
# minimum is 0 because each feeds a Relu: the 8-bit levels go to what the Relu keeps, up to
# that Relu's maximum, not to negatives it drops.
Ranges = dict[str, tuple[tuple[float, float], tuple[float, float]]]
RANGES: Ranges = {
    "/decoder.4/conv_in/conv/Conv": ((0.0, 26.86330795288086), (0.0, 5.553796768188477)),
    "/decoder.3/conv_in/conv/Conv": ((0.0, 14.410032272338867), (0.0, 5.428644180297852)),
    "/decoder.4/decoder.5/conv/Conv": ((0.0, 48.98515701293945), (0.0, 5.631294250488281)),
    "/decoder.4/encoder.0/conv/Conv": ((0.0, 5.553796768188477), (0.0, 11.599998474121094)),
}

# The sha256 of the weights the ranges were measured with: the shipped weights/u2netp.safetensors.
# Other u2netp weights (fine-tuned ones) have other activations: ``auto`` keeps them in fp32.
CALIBRATED_WEIGHTS = "2fb103d5c13807b75dc793a48b68949400d8e8637a96f8553390fe9b63f5f246"
# Vector instruction sets the form was measured faster on (AVX2, 1.3×; AVX-512 VNNI computes the
# int8 products natively). Older CPUs keep fp32 under ``auto``.
FASTER_ON = ("AVX2", "AVX512")
# A freshly built graph's largest mean |Δ| to fp32 on the check picture, in 1/255. The shipped
# ranges give 0.04; ranges a tenth as wide give 1.4. The eval photos allow 2 per photo.
BUILD_BOUND = 1.0


def suits(arch: str, digest: str, vector_isa: str) -> bool:
    """Whether ``auto`` picks this form: for the weights of sha256 ``digest`` whose ranges
    :data:`RANGES` are, on a CPU whose widest vector instruction set is ``vector_isa``."""
    return arch == ARCH and digest == CALIBRATED_WEIGHTS and vector_isa in FASTER_ON


class QuantizeError(Exception):
    """The graph cannot be given the int8-mixed form (not u2netp's, or the build failed)."""


def cache_path(arch: str, weights: Path, cache: Path, digest: str | None = None) -> Path:
    """Where the int8-mixed graph of ``arch`` with ``weights`` (sha256 ``digest``, computed
    when not given) is kept in ``cache``."""
    fp32 = exported.cache_path(arch, weights, cache, digest)
    return fp32.with_name(f"{fp32.stem}-{PRECISION}-q{FORMAT}.onnx")


def onnx_model(
    arch: str,
    weights: Path,
    cache: Path,
    refresh: bool = False,
    digest: str | None = None,
    refresh_export: bool | None = None,
) -> bytes:
    """The serialized int8-mixed graph of ``arch`` with ``weights``: from ``cache`` when it is
    there (unless ``refresh``), else built from the fp32 graph and kept there (seconds; ONNX
    Runtime's quantization tools import PyTorch where it is installed, so only later starts
    are without it). The fp32 graph is exported again with ``refresh_export`` (default:
    ``refresh``), else taken from the cache where it is.
    Raises QuantizeError for a model other than u2netp, and what exported.onnx_model raises."""
    if arch != ARCH:
        raise QuantizeError(f"{PRECISION} is made for {ARCH} only, not {arch}")
    digest = digest or exported.weights_digest(weights)
    export_again = refresh if refresh_export is None else refresh_export

    def make() -> bytes:
        log.info("building the %s form of model %s (once per weights file)", PRECISION, arch)
        return quantize(exported.onnx_model(arch, weights, cache, export_again, digest))

    path = cache_path(arch, weights, cache, digest)
    return exported.kept(path, f"{PRECISION} model", make, refresh)


def quantize(fp32: bytes, ranges: Ranges | None = None) -> bytes:
    """The int8-mixed graph made from the fp32 graph ``fp32`` (input ``input`` (N, 3, 320,
    320) float32, output ``saliency``), with ``ranges`` (default :data:`RANGES`) as
    ``TensorQuantOverrides``, naming its form in its metadata (``hotfolder.precision``).
    Raises QuantizeError when the graph lacks one of the nodes or cannot be quantized."""
    try:
        graph = build(fp32, RANGES if ranges is None else ranges)
    except QuantizeError:
        raise
    except Exception as exc:  # ONNX and ONNX Runtime raise many types for a graph they refuse
        raise QuantizeError(f"cannot build the {PRECISION} form: {exc}") from exc
    # A change in ONNX Runtime's quantization tools could build a graph that runs but draws
    # other mattes; it is caught here, once per build, not by a user looking at outputs.
    strays = deviation(fp32, graph)
    if strays > BUILD_BOUND:
        raise QuantizeError(
            f"the {PRECISION} form just built strays from fp32 by {strays:.2f}/255 on average "
            f"on the check picture (at most {BUILD_BOUND}/255 allowed)"
        )
    # The model and weights the export names are kept by the build; the form is added, so
    # that the fp32 graph under this form's name is told apart (exported.mismatch).
    return exported.with_metadata(graph, {exported.PRECISION_KEY: PRECISION})


def deviation(fp32: bytes, int8: bytes) -> float:
    """Mean |Δ| in 1/255 between the min–max normalised saliency maps of the graphs ``fp32``
    and ``int8`` (serialized ONNX) over :func:`check_picture`, each run on one thread."""
    import numpy as np

    from hotfolder.onnxengine import preprocess, session

    x = preprocess(check_picture())
    maps = []
    for graph in (fp32, int8):
        saliency = session(graph, 1).run(None, {"input": x})[0][0, 0]
        low, high = float(saliency.min()), float(saliency.max())
        maps.append((saliency - low) / max(high - low, 1e-6))
    return float(np.abs(maps[0] - maps[1]).mean() * 255)


def check_picture() -> Any:
    """A (320, 320, 3) uint8 stand-in for a product photo, the same on every machine: two
    textured objects, one round and one boxy, on a soft studio gradient."""
    import numpy as np

    y, x = np.mgrid[0:INPUT_SIZE, 0:INPUT_SIZE].astype(np.float32) / INPUT_SIZE
    picture = np.stack([200 + 30 * x, 205 + 20 * y, 210 - 25 * x], -1)
    texture = np.random.default_rng(0).normal(0, 12, (INPUT_SIZE, INPUT_SIZE, 1))
    ellipse = ((x - 0.47) / 0.28) ** 2 + ((y - 0.53) / 0.375) ** 2 < 1
    box = (abs(x - 0.72) < 0.11) & (abs(y - 0.34) < 0.19)
    for where, colour in ((ellipse, (170, 60, 40)), (box, (40, 70, 150))):
        picture[where] = (np.array(colour) + texture)[where]
    return np.clip(picture, 0, 255).astype(np.uint8)


def build(fp32: bytes, ranges: Ranges) -> bytes:
    """:func:`quantize`, in a folder of its own (ONNX Runtime's quantization works on files)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    with tempfile.TemporaryDirectory(prefix="hotfolder-int8-") as folder:
        model = preprocessed(fp32, Path(folder))
        overrides = tensor_overrides(model, ranges)
        output = Path(folder) / "int8-mixed.onnx"
        quantize_static(
            model, output, BlankInput(),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
            nodes_to_quantize=list(ranges), per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={
                "ActivationSymmetric": False, "WeightSymmetric": True,
                "TensorQuantOverrides": overrides,
            },
        )  # fmt: skip
        return output.read_bytes()


def preprocessed(fp32: bytes, folder: Path) -> Path:
    """``fp32`` after ONNX Runtime's pre-processing for quantization (shape inference,
    graph optimisation), written in ``folder``; its path."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, target = folder / "fp32.onnx", folder / "fp32-pre.onnx"
    source.write_bytes(fp32)
    quant_pre_process(source, target)
    return target


def tensor_overrides(model: Path, ranges: Ranges) -> dict[str, list[dict[str, Any]]]:
    """``TensorQuantOverrides`` for ONNX Runtime: each node's input and output tensor, named as
    in ``model``, with its range in float32. Raises QuantizeError for a node not in it."""
    import numpy as np
    import onnx

    nodes = {node.name: node for node in onnx.load(str(model)).graph.node}
    overrides: dict[str, list[dict[str, Any]]] = {}
    for name, (inputs, outputs) in ranges.items():
        node = nodes.get(name)
        if node is None or node.op_type != "Conv":
            raise QuantizeError(f"the graph has no convolution {name}: not {ARCH}'s")
        for tensor, (low, high) in ((node.input[0], inputs), (node.output[0], outputs)):
            overrides[tensor] = [{"rmin": np.float32(low), "rmax": np.float32(high)}]
    return overrides


class BlankInput:
    """The calibration data ONNX Runtime's API asks for: one blank image. Every range it
    measures is overridden, so it only has to run."""

    def __init__(self) -> None:
        import numpy as np

        self._inputs = iter([{"input": np.zeros((1, 3, INPUT_SIZE, INPUT_SIZE), np.float32)}])

    def get_next(self) -> dict[str, Any] | None:
        return next(self._inputs, None)
