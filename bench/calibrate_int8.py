"""Calibration ranges of the int8-mixed form (hotfolder/quantized.py RANGES).

    nice python bench/calibrate_int8.py          # prints RANGES for hotfolder/quantized.py
    nice python bench/calibrate_int8.py --check  # and checks that the shipped RANGES build the
                                                 # graph this calibration builds

Calibration photos: samples/*.jpg, 18 photos shipped with scikit-image, and one random crop
(50–90 % of each side, flipped half the time; seed 0) of each: 42 inputs, pre-processed as the
ONNX Runtime engine does (hotfolder.onnxengine.preprocess). ONNX Runtime's MinMax calibrator
measures the range of every Conv and Relu tensor of the fp32 graph after quant_pre_process;
each quantized convolution keeps its input's range, and its output gets [0, max of the Relu
it feeds] (the Relu drops the rest).

--check builds the graph the way a full calibration does (the calibrated ranges of the
convolutions' inputs, the Relu-aware output ranges) and compares it, byte for byte, with
hotfolder.quantized.quantize (the shipped RANGES, a blank calibration input).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from PIL import Image
from skimage import data

from hotfolder import config, exported, onnxengine, quantized

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights" / "u2netp.safetensors"
SKIMAGE_PHOTOS = (
    "rocket", "cat", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel", "logo",
    "coins", "camera", "moon", "clock", "page", "text", "brick", "grass", "gravel",
)  # fmt: skip
Ranges = dict[str, tuple[tuple[float, float], tuple[float, float]]]


def photos() -> list[np.ndarray]:
    """RGB uint8 photos: the samples, then scikit-image's."""
    found = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(ROOT.glob("samples/*.jpg"))]
    for name in SKIMAGE_PHOTOS:
        image = getattr(data, name)()
        if image.ndim == 2:
            image = np.stack([image] * 3, -1)
        found.append(np.ascontiguousarray(image[..., :3]).astype(np.uint8))
    left, right, _ = data.stereo_motorcycle()
    return [*found, left, right]


def calibration_images(seed: int = 0) -> list[np.ndarray]:
    """Each photo whole, and one random crop of it, flipped half the time."""
    rng = np.random.default_rng(seed)
    images = []
    for photo in photos():
        images.append(photo)
        height, width = photo.shape[:2]
        crop_h, crop_w = int(height * rng.uniform(0.5, 0.9)), int(width * rng.uniform(0.5, 0.9))
        y, x = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
        crop = photo[y : y + crop_h, x : x + crop_w]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        images.append(np.ascontiguousarray(crop))
    return images


class Inputs:
    """Calibration data for ONNX Runtime: the model inputs, one at a time."""

    def __init__(self, inputs: list[np.ndarray]) -> None:
        self._inputs = iter([{"input": x} for x in inputs])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._inputs, None)


def calibrate(pre: Path, inputs: list[np.ndarray], folder: Path) -> Any:
    """ONNX Runtime's MinMax ranges (TensorsData) of every Conv and Relu tensor."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    calibrator = create_calibrator(
        pre, ["Conv", "Relu"], augmented_model_path=str(folder / "augmented.onnx"),
        calibrate_method=CalibrationMethod.MinMax, providers=["CPUExecutionProvider"],
    )  # fmt: skip
    calibrator.collect_data(Inputs(inputs))
    return calibrator.compute_data()


def ranges_of(pre: Path, tensors: Any) -> Ranges:
    """RANGES from calibrated ``tensors``: each convolution's input range, and [0, max of the
    Relu its output feeds]."""
    graph = onnx.load(str(pre)).graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    nodes = {node.name: node for node in graph.node}
    ranges: Ranges = {}
    for name in quantized.RANGES or NODES:
        node = nodes[name]
        (relu,) = consumers[node.output[0]]
        assert relu.op_type == "Relu", name
        low, high = (scalar(v) for v in tensors[node.input[0]].range_value)
        ranges[name] = ((low, high), (0.0, scalar(tensors[relu.output[0]].range_value[1])))
    return ranges


def scalar(value: Any) -> float:
    """A calibrated bound (a float32 array of one element) as a float, exactly."""
    return float(np.asarray(value).reshape(-1)[0])


# The quantized convolutions, the largest first (38, 9.6, 9.6, 4.8 % of the multiply-adds).
NODES = (
    "/decoder.4/conv_in/conv/Conv",
    "/decoder.3/conv_in/conv/Conv",
    "/decoder.4/decoder.5/conv/Conv",
    "/decoder.4/encoder.0/conv/Conv",
)


def calibrated_graph(pre: Path, tensors: Any, ranges: Ranges) -> bytes:
    """The int8-mixed graph as a full calibration builds it: calibrated ranges for every tensor,
    the Relu-aware output ranges as the only overrides."""
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import QuantType, load_model_with_shape_infer

    nodes = {node.name: node for node in onnx.load(str(pre)).graph.node}
    overrides = {  # the inputs keep their calibrated ranges
        nodes[name].output[0]: [{"rmin": np.float32(low), "rmax": np.float32(high)}]
        for name, (_, (low, high)) in ranges.items()
    }
    quantizer = QDQQuantizer(
        load_model_with_shape_infer(pre), True, False, QuantType.QInt8, QuantType.QUInt8,
        tensors, list(ranges), [], ["Conv"],
        {"ActivationSymmetric": False, "WeightSymmetric": True, "TensorQuantOverrides": overrides},
    )  # fmt: skip
    quantizer.quantize_model()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "calibrated.onnx"
        quantizer.model.save_model_to_file(str(path), False)
        return path.read_bytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    fp32 = exported.onnx_model("u2netp", WEIGHTS, config.default_onnx_cache())
    inputs = [onnxengine.preprocess(image) for image in calibration_images()]
    with tempfile.TemporaryDirectory(prefix="calibrate-int8-") as folder:
        pre = quantized.preprocessed(fp32, Path(folder))
        tensors = calibrate(pre, inputs, Path(folder))
        ranges = ranges_of(pre, tensors)
        print(f"# {len(inputs)} calibration inputs")
        print("RANGES = {")
        for name, ((a, b), (c, d)) in ranges.items():
            print(f'    "{name}": (({a!r}, {b!r}), ({c!r}, {d!r})),')
        print("}")
        if not args.check:
            return 0
        if ranges != quantized.RANGES:
            print("the shipped RANGES differ from this calibration's", file=sys.stderr)
            return 1
        calibrated = calibrated_graph(pre, tensors, ranges)
    shipped = quantized.build(fp32, quantized.RANGES)  # as quantize() makes it, before its metadata
    same = calibrated == shipped
    print(f"calibrated graph {len(calibrated)} bytes, shipped {len(shipped)} bytes: "
          f"{'identical' if same else 'DIFFERENT'}")  # fmt: skip
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
