"""The int8-mixed form on ONNX Runtime: mattes close to fp32's (and not fp32's), built from the
shipped ranges, kept in the cache, asked for only where it can run."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from safetensors.numpy import load_file, save_file

from hotfolder import config, cpuinfo, evaluate, exported, imaging, quantized, runtime
from hotfolder.onnxengine import OnnxEngine
from hotfolder.runtime import EngineError

from . import corpus
from .conftest import ROOT, WEIGHTS

LIMIT_255 = 2.0  # largest mean |Δ| per matte to fp32's, in 1/255


@pytest.fixture(scope="module")
def int8_engine(onnx_cache: Path) -> OnnxEngine:
    engine = OnnxEngine("u2netp", WEIGHTS, onnx_cache, cpu_threads=2, precision="int8-mixed")
    engine.setup()
    return engine


def mean_deltas(ours: list[np.ndarray], theirs: list[np.ndarray]) -> list[float]:
    """Per matte, the mean |Δ| in 1/255."""
    return [float(np.abs(a.astype(np.int16) - b).mean()) for a, b in zip(ours, theirs, strict=True)]


def test_mattes_are_fp32s_within_two_levels_but_not_the_same(
    int8_engine: OnnxEngine, onnx_engine: OnnxEngine, photos: dict[str, np.ndarray]
) -> None:
    images = list(photos.values())
    ours, theirs = int8_engine.predict(images), onnx_engine.predict(images)
    assert [a.shape for a in ours] == [image.shape[:2] for image in images]
    deltas = mean_deltas(ours, theirs)
    assert max(deltas) <= LIMIT_255, deltas
    assert min(deltas) > 0, deltas  # the int8 graph, not the fp32 one, computed them
    assert int8_engine.precision == "int8-mixed"


def test_exactly_the_four_convolutions_are_int8(onnx_cache: Path, int8_engine: OnnxEngine) -> None:
    graph = onnx.load_from_string(
        quantized.cache_path("u2netp", WEIGHTS, onnx_cache).read_bytes()
    ).graph
    made_by = {output: node for node in graph.node for output in node.output}
    int8 = {
        node.name
        for node in graph.node
        if node.op_type == "Conv"
        and getattr(made_by.get(node.input[1]), "op_type", "") == "DequantizeLinear"
    }
    assert int8 == set(quantized.RANGES)
    assert sum(node.op_type == "Conv" for node in graph.node) > 100  # the rest stays fp32


def test_the_build_is_kept_and_named_by_its_format(
    onnx_cache: Path, int8_engine: OnnxEngine, caplog: pytest.LogCaptureFixture
) -> None:
    kept = quantized.cache_path("u2netp", WEIGHTS, onnx_cache)
    assert kept.name.endswith(f"-int8-mixed-q{quantized.FORMAT}.onnx")
    assert kept.stat().st_mode & 0o777 == 0o644
    caplog.set_level(logging.INFO, logger="hotfolder")
    OnnxEngine("u2netp", WEIGHTS, onnx_cache, cpu_threads=1, precision="int8-mixed").setup(
        warm_up=False
    )
    assert "building the int8-mixed form" not in caplog.text  # loaded from the cache
    assert "loaded on cpu (int8-mixed, ONNX Runtime 1." in caplog.text
    assert f"; {cpuinfo.describe()})" in caplog.text


START = """
import sys
from pathlib import Path
import numpy as np
from hotfolder.onnxengine import OnnxEngine
engine = OnnxEngine("u2netp", Path(sys.argv[1]), Path(sys.argv[2]), precision="int8-mixed")
engine.setup(warm_up=False)
engine.predict([np.zeros((100, 80, 3), np.uint8)])
print("torch" in sys.modules)
"""


def test_later_starts_never_import_pytorch(tmp_path: Path) -> None:
    """The build imports PyTorch (the export does, and ONNX Runtime's quantization tools
    import it where it is installed); starts from the kept graph do not."""

    def start() -> bool:
        result = subprocess.run(
            [sys.executable, "-c", START, str(WEIGHTS), str(tmp_path)],
            cwd=ROOT, capture_output=True, text=True, check=True, timeout=300,
        )  # fmt: skip
        return result.stdout.strip() == "True"

    assert start()
    assert quantized.cache_path("u2netp", WEIGHTS, tmp_path).is_file()
    assert not start()


def test_the_ranges_are_the_ones_built_in(onnx_cache: Path, int8_engine: OnnxEngine) -> None:
    """The graph's activation scales are those of RANGES, not of the blank calibration input."""
    graph = onnx.load_from_string(
        quantized.cache_path("u2netp", WEIGHTS, onnx_cache).read_bytes()
    ).graph
    values = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    made_by = {output: node for node in graph.node for output in node.output}
    for node in graph.node:
        if node.name not in quantized.RANGES:
            continue
        dequantize = made_by[node.input[0]]
        scale, zero_point = (values[name] for name in dequantize.input[1:3])
        (_, high), _ = quantized.RANGES[node.name]
        assert int(zero_point) == 0  # inputs are Relu or concatenated Relu outputs: ≥ 0
        assert float(scale) == pytest.approx(high / 255, rel=1e-6)


def test_a_build_that_strays_from_fp32_is_refused(onnx_cache: Path) -> None:
    """Ranges a tenth as wide as the measured ones (as a change in ONNX Runtime's tools might
    give) build a graph that runs; the check against fp32 refuses it before it is kept."""
    fp32 = exported.onnx_model("u2netp", WEIGHTS, onnx_cache)
    narrow = {
        name: ((low_in, high_in / 10), (low_out, high_out / 10))
        for name, ((low_in, high_in), (low_out, high_out)) in quantized.RANGES.items()
    }
    with pytest.raises(quantized.QuantizeError, match=r"strays from fp32 by [\d.]+/255"):
        quantized.quantize(fp32, narrow)
    shipped = quantized.quantize(fp32)
    assert quantized.deviation(fp32, shipped) < quantized.BUILD_BOUND / 10


def test_auto_runs_fp32_when_the_int8_form_cannot_be_made(
    onnx_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without ONNX Runtime's quantization tools (some packagings leave them out) the
    int8-mixed form cannot be built: ``auto`` starts on fp32 and says why; asking for
    int8-mixed by name is an error."""
    if cpuinfo.vector_isa() not in quantized.FASTER_ON:
        pytest.skip(f"a {cpuinfo.vector_isa()} CPU keeps fp32")
    cache = tmp_path / "cache"
    cache.mkdir()
    export = exported.cache_path("u2netp", WEIGHTS, onnx_cache)
    # Only the int8-mixed form is missing from the cache.
    (cache / export.name).write_bytes(exported.onnx_model("u2netp", WEIGHTS, onnx_cache))
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)
    caplog.set_level(logging.WARNING, logger="hotfolder")
    engine = started(WEIGHTS, cache)
    assert engine.precision == "fp32"
    assert "precision auto: fp32, since the int8-mixed form cannot be made: " in caplog.text
    photo = np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)
    assert engine.predict([photo])[0].shape == (48, 64)
    named = OnnxEngine("u2netp", WEIGHTS, cache, cpu_threads=1, precision="int8-mixed")
    with pytest.raises(EngineError, match="cannot build the int8-mixed form"):
        named.setup(warm_up=False)


def test_other_models_and_precisions_are_refused(tmp_path: Path) -> None:
    other = OnnxEngine("u2net", WEIGHTS, tmp_path, precision="int8-mixed")
    with pytest.raises(EngineError, match="int8-mixed is made for u2netp only"):
        other.setup()
    with pytest.raises(EngineError, match="'bf16' on ONNX Runtime is not one of"):
        OnnxEngine("u2netp", WEIGHTS, tmp_path, precision="bf16")
    assert not list(tmp_path.iterdir())  # nothing kept


def model(**settings: object) -> config.ModelConfig:
    return config.parse({"model": settings}, base=Path.cwd()).model


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"runtime": "torch"}, "int8-mixed runs on ONNX Runtime; set model.runtime to auto"),
        ({"device": "cuda"}, "int8-mixed is for the CPU; model.device is 'cuda'"),
        ({"runtime": "onnxruntime", "device": "cuda:0"}, "onnxruntime runs on the CPU"),
        ({"name": "u2net"}, "int8-mixed is made for u2netp only; model 'u2net'"),
    ],
)
def test_impossible_int8_settings_are_refused(settings: dict[str, str], message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        model(precision="int8-mixed", **settings)


def test_int8_mixed_runs_on_onnx_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    assert runtime.choose(model(precision="int8-mixed")) == runtime.ONNXRUNTIME
    assert runtime.choose(model(precision="int8-mixed", runtime="onnxruntime")) == "onnxruntime"
    assert OnnxEngine("u2netp", WEIGHTS, Path("unused")).precision == "fp32"
    monkeypatch.setattr(cpuinfo, "nvidia_gpu_present", lambda: True)  # a GPU server
    assert runtime.choose(model(precision="int8-mixed")) == runtime.ONNXRUNTIME


def started(weights: Path, cache: Path) -> OnnxEngine:
    engine = OnnxEngine("u2netp", weights, cache, cpu_threads=1, precision="auto")
    engine.setup(warm_up=False)
    return engine


def test_auto_is_int8_mixed_only_for_the_calibrated_weights_on_avx2(
    onnx_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if cpuinfo.vector_isa() not in quantized.FASTER_ON:
        pytest.skip(f"a {cpuinfo.vector_isa()} CPU keeps fp32")
    assert model().precision == "auto"
    assert started(WEIGHTS, onnx_cache).precision == "int8-mixed"
    # Fine-tuned weights of the same model: the shipped ranges are not theirs.
    state = load_file(WEIGHTS)
    name = next(iter(state))
    state[name] = state[name] * 1.001
    tuned = tmp_path / "tuned.safetensors"
    save_file(state, tuned)
    caplog.set_level(logging.INFO, logger="hotfolder")
    assert started(tuned, onnx_cache).precision == "fp32"
    because = "precision auto: fp32 rather than int8-mixed, for "
    assert f"{because}weights other than the shipped ones it is calibrated for ({tuned})" in (
        caplog.text
    )
    monkeypatch.setattr(cpuinfo, "vector_isa", lambda: "AVX")  # an older CPU
    assert started(WEIGHTS, onnx_cache).precision == "fp32"
    assert f"{because}this CPU (AVX; it is faster on AVX2 and AVX512)" in caplog.text


def scores(pairs: list[evaluate.Pair], alphas: list[np.ndarray]) -> dict[str, float]:
    """``hotfolder eval``'s metrics of ``alphas`` for ``pairs``."""
    truths = [evaluate.read_truth(pair.truth) for pair in pairs]
    if all(pair.soft for pair in pairs):
        per_image = [evaluate.soft_alpha_scores(a, t) for a, t in zip(alphas, truths, strict=True)]
        return {name: float(np.mean([s[name] for s in per_image])) for name in per_image[0]}
    return evaluate.mask_scores(alphas, truths)


@pytest.mark.parametrize("dataset", ["alphamatting_lowres", "sod_bsds"])
def test_eval_scores_are_fp32s_within_one_percent(
    int8_engine: OnnxEngine, onnx_engine: OnnxEngine, shared_eval: Path, dataset: str
) -> None:
    pairs = evaluate.read_pairs(shared_eval / dataset)
    ours: list[np.ndarray] = []
    theirs: list[np.ndarray] = []
    for start in range(0, len(pairs), 8):
        pictures = [imaging.decode(p.image.read_bytes()).rgb for p in pairs[start : start + 8]]
        ours += int8_engine.predict(pictures)
        theirs += onnx_engine.predict(pictures)
    assert max(mean_deltas(ours, theirs)) <= LIMIT_255
    int8, fp32 = scores(pairs, ours), scores(pairs, theirs)
    assert len(fp32) >= 3
    for name, value in fp32.items():
        assert int8[name] == pytest.approx(value, rel=0.01), name


def test_the_matte_command_runs_int8_mixed_when_configured(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(f"model: {{precision: int8-mixed, onnx_cache: {tmp_path / 'cache'}}}\n")
    out = tmp_path / "chelsea.png"
    result = subprocess.run(
        [sys.executable, "-m", "hotfolder", "matte", "-c", str(config_file),
         str(ROOT / "samples" / "chelsea.jpg"), str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "loaded on cpu (int8-mixed, ONNX Runtime" in result.stderr
    assert quantized.cache_path("u2netp", WEIGHTS, tmp_path / "cache").is_file()
    assert corpus.load(out)[1].shape == (300, 451, 4)


def test_a_cached_graph_of_the_other_form_is_never_run_as_this_one(
    onnx_cache: Path, int8_engine: OnnxEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The fp32 export under the int8-mixed name (or the reverse) names the same model and
    weights: its form must be told apart too, else the log and ``hotfolder check`` announce
    one form while the other runs."""
    fp32 = exported.onnx_model("u2netp", WEIGHTS, onnx_cache)  # both built by now
    int8 = quantized.onnx_model("u2netp", WEIGHTS, onnx_cache)
    for precision, foreign in (("int8-mixed", fp32), ("fp32", int8)):
        cache = tmp_path / precision
        cache.mkdir()
        (cache / exported.cache_path("u2netp", WEIGHTS, cache).name).write_bytes(fp32)
        kept = (quantized if precision == "int8-mixed" else exported).cache_path(
            "u2netp", WEIGHTS, cache
        )
        kept.write_bytes(foreign)
        caplog.clear()
        engine = OnnxEngine("u2netp", WEIGHTS, cache, cpu_threads=1, precision=precision)
        engine.setup(warm_up=False)
        assert f"{kept} is not this model's" in caplog.text, precision
        assert kept.read_bytes() != foreign


def test_a_cached_name_that_is_no_file_is_named_in_the_warning(
    onnx_cache: Path, int8_engine: OnnxEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder under the int8-mixed graph's name: the warnings say which file, and why."""
    fp32 = exported.cache_path("u2netp", WEIGHTS, onnx_cache)
    (tmp_path / fp32.name).write_bytes(fp32.read_bytes())
    kept = quantized.cache_path("u2netp", WEIGHTS, tmp_path)
    kept.mkdir()
    engine = OnnxEngine("u2netp", WEIGHTS, tmp_path, cpu_threads=1, precision="int8-mixed")
    engine.setup(warm_up=False)
    assert f"cannot read the int8-mixed model {kept} (not a regular file)" in caplog.text
    assert f"cannot keep the int8-mixed model as {kept} (" in caplog.text
    assert engine.predict([np.zeros((40, 30, 3), np.uint8)])[0].shape == (40, 30)


def test_a_damaged_export_is_exported_again_before_the_build(
    onnx_cache: Path, int8_engine: OnnxEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The int8-mixed graph is built from the kept fp32 export: one damaged since it was
    written is exported again, as it is for fp32, rather than refusing to start."""
    fp32 = exported.cache_path("u2netp", WEIGHTS, onnx_cache)
    damaged = tmp_path / fp32.name
    damaged.write_bytes(fp32.read_bytes()[: fp32.stat().st_size // 2])  # cut short
    engine = OnnxEngine("u2netp", WEIGHTS, tmp_path, cpu_threads=1, precision="int8-mixed")
    engine.setup(warm_up=False)
    assert caplog.text.count(f"cannot build the int8-mixed form from {damaged}") == 1
    assert damaged.read_bytes() == fp32.read_bytes()  # the export is deterministic
    assert quantized.cache_path("u2netp", WEIGHTS, tmp_path).is_file()
    assert engine.precision == "int8-mixed"


def test_a_damaged_graph_is_built_again_from_the_kept_export(
    onnx_cache: Path, int8_engine: OnnxEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the int8-mixed graph is made again: the kept export is sound, and exporting
    imports PyTorch and takes seconds more."""
    fp32 = exported.cache_path("u2netp", WEIGHTS, onnx_cache)
    (tmp_path / fp32.name).write_bytes(fp32.read_bytes())
    built = quantized.cache_path("u2netp", WEIGHTS, onnx_cache)
    damaged = tmp_path / built.name
    damaged.write_bytes(built.read_bytes()[: built.stat().st_size // 2])  # cut short
    caplog.set_level(logging.INFO, logger="hotfolder")
    engine = OnnxEngine("u2netp", WEIGHTS, tmp_path, cpu_threads=1, precision="int8-mixed")
    engine.setup(warm_up=False)
    assert f"the cached model {damaged} is damaged" in caplog.text
    assert "building the int8-mixed form" in caplog.text
    assert "exporting model" not in caplog.text
    assert damaged.read_bytes() == built.read_bytes()  # the build is deterministic
