"""CPU forms of the model against fp32: matte quality on the eval sets, and speed.

    nice python bench/cpu_paths.py --eval ../shared/eval --out cpu_paths.json

Forms: ``onnxruntime`` (the engine for fp32 on the CPU, hotfolder/onnxengine.py: the model
exported to ONNX Runtime, with its own pre- and post-processing in Pillow and OpenCV),
``onnxruntime-int8-mixed`` (the same engine with ``model.precision: int8-mixed``,
hotfolder/quantized.py), and from
hotfolder/cpupaths.py ``frozen`` (TorchScript, traced and frozen for oneDNN's fused
kernels), ``bf16`` (bf16 autocast everywhere), ``bf16-edges`` (all but the first and last stages in
bf16: those, the side outputs and their fusion in fp32), ``bf16-mixed`` (the engine's: only the two
full-resolution stages in bf16).

Quality: every eval image through fp32 and each form; each ``hotfolder eval`` metric and its
change against fp32 in %, and the per-image mean |Δ| to fp32 in 1/255 (worst and average).
Speed: the model alone, one 320×320 image per call on one thread (as the engine runs each image
on the CPU), the forms timed in turns over several rounds so that load from other processes falls
on all of them alike; the median per form and its ratio to fp32. On a CPU without native bf16
(no AVX-512 BF16 or AMX), bf16 is emulated: its quality figures hold, its speed does not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from hotfolder import config, cpupaths, evaluate, exported, imaging, models, onnxengine, quantized
from hotfolder.engine import MattingEngine
from hotfolder.onnxengine import OnnxEngine
from hotfolder.runtime import Engine

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights" / "u2netp.safetensors"
FORMS = (
    "fp32", "onnxruntime", "onnxruntime-int8-mixed", "frozen", "bf16", "bf16-edges", "bf16-mixed",
)  # fmt: skip
ONNX_CACHE = config.default_onnx_cache()


class OnnxRuntimeForm(torch.nn.Module):
    """The model exported to ONNX Runtime (in ``precision``: fp32 or int8-mixed), on one
    thread, in a PyTorch model's place."""

    def __init__(self, precision: str = "fp32") -> None:
        super().__init__()
        self.precision = precision
        int8 = precision == quantized.PRECISION
        build = quantized.onnx_model if int8 else exported.onnx_model
        self.session = onnxengine.session(build("u2netp", WEIGHTS, ONNX_CACHE), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"input": x.contiguous().numpy()})[0])


EDGES = ("encoder.0", "decoder.4", "side", "outconv")


def build(form: str) -> torch.nn.Module:
    model = models.load("u2netp", WEIGHTS).to(memory_format=torch.channels_last)
    example = torch.zeros(1, 3, 320, 320).contiguous(memory_format=torch.channels_last)
    keep = {"bf16": (), "bf16-edges": EDGES, "bf16-mixed": cpupaths.KEEP_FP32}
    if form == "onnxruntime":
        return OnnxRuntimeForm()
    if form == "onnxruntime-int8-mixed":
        return OnnxRuntimeForm(quantized.PRECISION)
    if form == "frozen":
        return cpupaths.frozen(model, example)
    if form in keep:
        return cpupaths.bf16_except(model, keep[form])
    return model


def engine_with(model: torch.nn.Module) -> Engine:
    """An fp32 engine (its pre- and post-processing) running ``model`` instead of its own; for
    the ``onnxruntime`` forms the ONNX Runtime engine itself, as it runs on one core."""
    if isinstance(model, OnnxRuntimeForm):
        onnx = OnnxEngine("u2netp", WEIGHTS, ONNX_CACHE, cpu_threads=1, precision=model.precision)
        onnx.setup(warm_up=False)
        return onnx
    engine = MattingEngine("u2netp", WEIGHTS, "cpu", "fp32", cpu_threads=1)
    engine.setup(warm_up=False)
    engine._model = model  # benchmark only: the form under test in the engine's place
    return engine


def time_forms(forms: dict[str, torch.nn.Module], rounds: int) -> dict[str, float]:
    torch.set_num_threads(1)
    x = torch.randn(1, 3, 320, 320).contiguous(memory_format=torch.channels_last)
    samples: dict[str, list[float]] = {name: [] for name in forms}
    with torch.inference_mode():
        for model in forms.values():
            model(x)
        for _ in range(rounds):
            for name, model in forms.items():
                started = time.perf_counter()
                model(x)
                samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(s) for name, s in samples.items()}


def score(
    pairs: list[evaluate.Pair], alphas: list[np.ndarray], truths: list[np.ndarray]
) -> dict[str, float]:
    if all(p.soft for p in pairs):
        per_image = [evaluate.soft_alpha_scores(a, t) for a, t in zip(alphas, truths, strict=True)]
        return {k: float(np.mean([s[k] for s in per_image])) for k in per_image[0]}
    return evaluate.mask_scores(alphas, truths)


def predict(engine: Engine, pictures: list[np.ndarray]) -> list[np.ndarray]:
    """In batches of 8: one batch of a whole dataset on one thread takes tens of GB."""
    return [a for i in range(0, len(pictures), 8) for a in engine.predict(pictures[i : i + 8])]


def quality(forms: dict[str, torch.nn.Module], datasets: list[Path]) -> dict[str, object]:
    engines = {name: engine_with(model) for name, model in forms.items()}
    report: dict[str, dict[str, object]] = {name: {} for name in forms}
    deltas: dict[str, list[float]] = {name: [] for name in forms}
    for dataset in datasets:
        pairs = evaluate.read_pairs(dataset)
        pictures = [imaging.decode(p.image.read_bytes()).rgb for p in pairs]
        truths = [evaluate.read_truth(p.truth) for p in pairs]
        reference = predict(engines["fp32"], pictures)
        base = score(pairs, reference, truths)
        for name, engine in engines.items():
            alphas = reference if name == "fp32" else predict(engine, pictures)
            deltas[name] += [
                float(np.abs(a.astype(np.int16) - r).mean())
                for a, r in zip(alphas, reference, strict=True)
            ]
            scores = score(pairs, alphas, truths)
            report[name][dataset.name] = {
                k: [v, 100 * (v - base[k]) / base[k]] for k, v in scores.items()
            }
            print(name, dataset.name, report[name][dataset.name], flush=True)
    for name in forms:
        report[name]["mean_delta_255"] = {
            "worst": max(deltas[name]),
            "average": statistics.fmean(deltas[name]),
        }
    return dict(report)


def held_out(forms: dict[str, torch.nn.Module]) -> dict[str, list[float]]:
    """Per-image mean |Δ| to fp32 in 1/255 on scikit-image's colour photos: no ground truth is
    needed, so it runs where the eval set is absent (a lent GPU machine's processor, say)."""
    from skimage import data

    names = ("astronaut", "chelsea", "coffee", "rocket", "retina")
    pictures = [getattr(data, name)() for name in names]
    pictures.append(np.stack([data.horse().astype(np.uint8) * 255] * 3, -1))  # a silhouette
    engines = {name: engine_with(model) for name, model in forms.items()}
    reference = predict(engines["fp32"], pictures)
    return {
        name: [
            round(float(np.abs(a.astype(np.int16) - r).mean()), 3)
            for a, r in zip(predict(engine, pictures), reference, strict=True)
        ]
        for name, engine in engines.items()
        if name != "fp32"
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval", type=Path, default=ROOT.parent / "shared" / "eval")
    parser.add_argument("--forms", nargs="+", default=list(FORMS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--held-out", action="store_true",
                        help="mean |Δ| to fp32 on scikit-image photos, no eval set")  # fmt: skip
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    forms = {name: build(name) for name in ["fp32", *(f for f in args.forms if f != "fp32")]}
    report: dict[str, object] = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if not args.skip_speed:
        speeds = time_forms(forms, args.rounds)
        report["seconds_per_image"] = speeds
        report["speedup"] = {name: speeds["fp32"] / s for name, s in speeds.items()}
        print(json.dumps(report, indent=1), flush=True)
    if not args.skip_quality:
        datasets = [args.eval / d for d in ("alphamatting_lowres", "sod_bsds")]
        report["quality"] = quality(forms, [d for d in datasets if d.is_dir()])
    if args.held_out:
        report["held_out_mean_delta_255"] = held_out(forms)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
