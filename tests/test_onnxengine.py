"""The model on ONNX Runtime: the same mattes as on PyTorch, its export kept and checked, and a
CPU start without PyTorch."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hotfolder import config, cpuinfo, exported, onnxengine, optimized, runtime
from hotfolder.engine import MattingEngine
from hotfolder.onnxengine import OnnxEngine
from hotfolder.runtime import EngineError

from .conftest import ROOT, WEIGHTS


def odd_sizes(photos: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Real photos, and crops smaller than the model's input, one pixel wide, and far wider."""
    astronaut = photos["astronaut"]
    wide = np.ascontiguousarray(np.tile(astronaut[:100], (1, 8, 1)))  # 4096 × 100
    return [*photos.values(), astronaut[:200, :150].copy(), astronaut[:, :1].copy(), wide]


def assert_within_rounding(ours: list[np.ndarray], theirs: list[np.ndarray]) -> None:
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        assert a.dtype == b.dtype == np.uint8
        difference = np.abs(a.astype(np.int16) - b)
        assert difference.max() <= 2  # Pillow resizes in fixed point, PyTorch in float
        assert difference.mean() < 0.05


def test_mattes_are_pytorchs_within_rounding(
    onnx_engine: OnnxEngine, engine: MattingEngine, photos: dict[str, np.ndarray]
) -> None:
    images = odd_sizes(photos)
    assert_within_rounding(onnx_engine.predict(images), engine.predict(images))
    alone = [onnx_engine.predict([image])[0] for image in images[:2]]  # on both cores at once
    assert_within_rounding(alone, engine.predict(images[:2]))


def test_flip_averaged_mattes_are_pytorchs(onnx_cache: Path, photos: dict[str, np.ndarray]) -> None:
    ours = OnnxEngine("u2netp", WEIGHTS, onnx_cache, flip_average=True, cpu_threads=2)
    ours.setup(warm_up=False)
    theirs = MattingEngine("u2netp", WEIGHTS, "cpu", "fp32", flip_average=True, cpu_threads=2)
    theirs.setup(warm_up=False)
    images = list(photos.values())[:2]
    assert_within_rounding(ours.predict(images), theirs.predict(images))
    plain = OnnxEngine("u2netp", WEIGHTS, onnx_cache, cpu_threads=2)
    plain.setup(warm_up=False)
    assert any(  # flipping is not a no-op
        np.abs(a.astype(np.int16) - b).max() > 1
        for a, b in zip(ours.predict(images), plain.predict(images), strict=True)
    )


START_WITHOUT_TORCH = """
import sys
import time
from pathlib import Path
from hotfolder.onnxengine import OnnxEngine
import numpy as np
engine = OnnxEngine("u2netp", Path(sys.argv[1]), Path(sys.argv[2]))
engine.setup()
engine.predict([np.zeros((100, 80, 3), np.uint8)])
print("torch" in sys.modules)
"""


def start(cache: Path) -> bool:
    """Whether an engine's start with ``cache``, in a process of its own, imported PyTorch."""
    result = subprocess.run(
        [sys.executable, "-c", START_WITHOUT_TORCH, str(WEIGHTS), str(cache)],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    return result.stdout.strip() == "True"


def test_the_export_is_kept_and_later_starts_never_import_pytorch(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert start(cache)  # exported, with PyTorch
    kept = exported.cache_path("u2netp", WEIGHTS, cache)
    both = sorted([kept, optimized.cache_path(kept)])  # and ONNX Runtime's optimized form
    assert sorted(cache.iterdir()) == both
    assert all(path.stat().st_mode & 0o777 == 0o644 for path in both)
    assert not start(cache)
    assert sorted(cache.iterdir()) == both


def test_other_weights_get_an_export_of_their_own(tmp_path: Path) -> None:
    """A weights file replaced in place (same name) must never run on the old graph."""
    weights = tmp_path / "u2netp.safetensors"
    weights.write_bytes(WEIGHTS.read_bytes())
    first = exported.cache_path("u2netp", weights, tmp_path)
    weights.write_bytes(WEIGHTS.read_bytes() + b" ")  # any change of content
    assert exported.cache_path("u2netp", weights, tmp_path) != first


def test_a_damaged_export_is_exported_again(
    onnx_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    kept = exported.cache_path("u2netp", WEIGHTS, onnx_cache)
    exported.onnx_model("u2netp", WEIGHTS, onnx_cache)  # exported by now, for this session
    damaged = cache / kept.name
    damaged.write_bytes(kept.read_bytes()[: kept.stat().st_size // 2])  # cut short
    engine = OnnxEngine("u2netp", WEIGHTS, cache, cpu_threads=1)
    engine.setup()
    assert "is damaged" in caplog.text
    assert damaged.read_bytes() == kept.read_bytes()  # the export is deterministic
    assert engine.predict([np.zeros((40, 30, 3), np.uint8)])[0].shape == (40, 30)


def test_a_cached_graph_of_another_model_is_exported_again(
    onnx_cache: Path, rembg_onnx: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A graph in the cache under these weights' name that is not their export (another
    program's model, or the export of other weights copied over it) is never run."""
    from safetensors.torch import load_file, save_file

    ours = exported.onnx_model("u2netp", WEIGHTS, onnx_cache)  # exported by now, for this session
    other = tmp_path / "other.safetensors"
    tensors = load_file(WEIGHTS)
    name = next(iter(tensors))
    save_file({**tensors, name: tensors[name] + 0.01}, other)
    cache = tmp_path / "cache"
    cache.mkdir()
    for weights, foreign in ((WEIGHTS, rembg_onnx.read_bytes()), (other, ours)):
        kept = exported.cache_path("u2netp", weights, cache)
        kept.write_bytes(foreign)
        caplog.clear()
        engine = OnnxEngine("u2netp", weights, cache, cpu_threads=1)
        engine.setup(warm_up=False)
        assert f"the cached model {kept} is not this model's" in caplog.text
        assert kept.read_bytes() != foreign
        assert engine.predict([np.zeros((40, 30, 3), np.uint8)])[0].shape == (40, 30)
    assert exported.onnx_model("u2netp", WEIGHTS, cache) == ours


def test_a_cached_name_that_is_no_file_is_exported_over(
    onnx_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A FIFO under the graph's name would block a start forever, without a word."""
    exported.onnx_model("u2netp", WEIGHTS, onnx_cache)  # exported by now, for this session
    kept = exported.cache_path("u2netp", WEIGHTS, tmp_path)
    os.mkfifo(kept)
    OnnxEngine("u2netp", WEIGHTS, tmp_path, cpu_threads=1).setup(warm_up=False)
    assert f"cannot read the exported model {kept} (not a regular file)" in caplog.text
    assert kept.read_bytes() == exported.cache_path("u2netp", WEIGHTS, onnx_cache).read_bytes()


def test_a_cache_that_cannot_be_written_costs_only_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would be")
    engine = OnnxEngine("u2netp", WEIGHTS, blocked, cpu_threads=1)
    engine.setup()
    assert "cannot keep the exported model" in caplog.text
    assert engine.predict([np.zeros((40, 30, 3), np.uint8)])[0].shape == (40, 30)


def test_unusable_weights_are_an_engine_error(tmp_path: Path) -> None:
    missing = OnnxEngine("u2netp", tmp_path / "nowhere.safetensors", tmp_path)
    with pytest.raises(EngineError, match=r"nowhere\.safetensors"):
        missing.setup()
    other = OnnxEngine("u2net", WEIGHTS, tmp_path)  # u2netp's weights for u2net
    with pytest.raises(EngineError, match="does not fit model 'u2net'"):
        other.setup()
    assert not list(tmp_path.iterdir())  # nothing kept


def test_a_graph_that_computes_otherwise_is_refused(onnx_cache: Path) -> None:
    data = exported.onnx_model("u2netp", WEIGHTS, onnx_cache)
    x = np.random.default_rng(0).random((1, 3, 320, 320), np.float32)
    right = onnxengine.session(data, 1).run(None, {"input": x})[0]
    exported.check(data, x, right)
    with pytest.raises(exported.ExportError, match="differs from PyTorch"):
        exported.check(data, x, right + 2 * exported.TOLERANCE)


def model(**settings: object) -> config.ModelConfig:
    return config.parse({"model": settings}, base=Path.cwd()).model


def test_auto_is_onnx_runtime_for_fp32_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert runtime.choose(model(device="cpu")) == runtime.ONNXRUNTIME
    for other in ({"precision": "bf16-mixed"}, {"precision": "bf16"}, {"compile": True}):
        assert runtime.choose(model(device="cpu", **other)) == runtime.TORCH, other
    assert runtime.choose(model(device="cuda")) == runtime.TORCH
    assert runtime.choose(model(device="cpu", runtime="torch")) == runtime.TORCH
    gpu = cpuinfo.nvidia_gpu_present()
    assert runtime.choose(model()) == (runtime.TORCH if gpu else runtime.ONNXRUNTIME)
    monkeypatch.setattr(cpuinfo, "nvidia_gpu_present", lambda: True)  # a GPU server
    assert runtime.choose(model()) == runtime.TORCH


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"runtime": "tensorrt"}, "model.runtime: 'tensorrt' is not one of auto, torch, onnx"),
        ({"runtime": "onnxruntime", "device": "cuda"}, "onnxruntime runs on the CPU"),
        ({"runtime": "onnxruntime", "precision": "bf16"}, "'bf16' needs torch"),
        ({"runtime": "onnxruntime", "compile": True}, "model.compile is torch.compile: it needs"),
    ],
)
def test_impossible_runtimes_are_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        model(**settings)


def test_the_log_names_the_runtime_and_the_cpu(
    onnx_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hotfolder")
    OnnxEngine("u2netp", WEIGHTS, onnx_cache, cpu_threads=1).setup(warm_up=False)
    assert "loaded on cpu (fp32, ONNX Runtime 1." in caplog.text
    assert f"; {cpuinfo.describe()})" in caplog.text


def cache_with_the_export(onnx_cache: Path, folder: Path) -> Path:
    """A cache folder of its own in ``folder`` holding only the kept fp32 export (a copy)."""
    kept = exported.cache_path("u2netp", WEIGHTS, onnx_cache)
    exported.onnx_model("u2netp", WEIGHTS, onnx_cache)  # exported by now, for this session
    cache = folder / "cache"
    cache.mkdir()
    (cache / kept.name).write_bytes(kept.read_bytes())
    return cache


def mattes(cache: Path, photos: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The mattes of an engine started from ``cache``: one photo alone, then two side by side."""
    engine = OnnxEngine("u2netp", WEIGHTS, cache, cpu_threads=2)
    engine.setup(warm_up=False)
    images = list(photos.values())
    return engine.predict(images[:1]) + engine.predict(images[1:3])


def identical(ours: list[np.ndarray], theirs: list[np.ndarray]) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))


def started_once(
    onnx_cache: Path, folder: Path, photos: dict[str, np.ndarray]
) -> tuple[Path, Path, Path, list[np.ndarray]]:
    """A cache folder of its own holding the export, after one start from it (which keeps the
    optimized form): the cache, the export's path, the optimized form's, that start's mattes."""
    cache = cache_with_the_export(onnx_cache, folder)
    first = mattes(cache, photos)
    kept = exported.cache_path("u2netp", WEIGHTS, cache)
    return cache, kept, optimized.cache_path(kept), first


def test_the_optimized_form_is_kept_and_computes_the_same(
    onnx_cache: Path,
    tmp_path: Path,
    photos: dict[str, np.ndarray],
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache, kept, fast, first = started_once(onnx_cache, tmp_path, photos)
    assert fast.name.startswith(f"{kept.stem}-opt-ort1.")
    assert fast.stat().st_mode & 0o777 == 0o644
    kept.write_bytes(b"not a graph")  # later starts load the optimized form, not the export
    for _ in range(2):
        assert identical(mattes(cache, photos), first)
    assert "damaged" not in caplog.text


def test_a_damaged_optimized_form_is_made_again(
    onnx_cache: Path,
    tmp_path: Path,
    photos: dict[str, np.ndarray],
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache, _, fast, first = started_once(onnx_cache, tmp_path, photos)
    whole = fast.read_bytes()
    for damaged in (whole[: len(whole) // 2], b"\0" * 4096):  # cut short; zeros after a crash
        fast.write_bytes(damaged)
        caplog.clear()
        again = mattes(cache, photos)
        assert f"the optimized model {fast} is damaged" in caplog.text
        assert identical(again, first)
        caplog.clear()
        mattes(cache, photos)  # made again: loaded by the next start
        assert "optimized model" not in caplog.text


def with_bytes_changed(data: bytes) -> bytes:
    """``data`` with four bytes in its middle set to 0xff: inside a weight tensor of a graph,
    so that it still loads (a bit flipped on disk, a block overwritten) but computes NaNs."""
    middle = len(data) // 2
    return data[:middle] + b"\xff" * 4 + data[middle + 4 :]


@pytest.mark.parametrize("which", ["optimized form", "export"])
def test_a_graph_damaged_inside_its_weights_is_made_again(
    which: str,
    onnx_cache: Path,
    tmp_path: Path,
    photos: dict[str, np.ndarray],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Damage that leaves a valid protobuf loads in ONNX Runtime without a word: each kept
    graph carries a checksum of its content, so it is made again rather than run."""
    cache, kept, fast, first = started_once(onnx_cache, tmp_path, photos)
    damaged = fast if which == "optimized form" else kept
    if which == "export":
        fast.unlink()  # the next start loads the export
    damaged.write_bytes(with_bytes_changed(damaged.read_bytes()))
    caplog.clear()
    again = mattes(cache, photos)
    assert str(damaged) in caplog.text
    assert "damaged" in caplog.text
    assert identical(again, first)


def test_an_optimized_form_of_another_form_is_never_run(
    onnx_cache: Path,
    tmp_path: Path,
    photos: dict[str, np.ndarray],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The optimized int8-mixed graph under the fp32 one's name names the same model and
    weights: its form is told apart, as for the graphs it is made from."""
    from hotfolder import quantized

    cache = cache_with_the_export(onnx_cache, tmp_path)
    int8 = OnnxEngine("u2netp", WEIGHTS, cache, cpu_threads=1, precision="int8-mixed")
    int8.setup(warm_up=False)
    int8_fast = optimized.cache_path(quantized.cache_path("u2netp", WEIGHTS, cache))
    fast = optimized.cache_path(exported.cache_path("u2netp", WEIGHTS, cache))
    fast.write_bytes(int8_fast.read_bytes())
    caplog.clear()
    mattes(cache, photos)
    assert f"the optimized model {fast} is not this model's: it is the int8-mixed form" in (
        caplog.text
    )
    assert fast.read_bytes() != int8_fast.read_bytes()


def test_another_cpu_or_onnx_runtime_gets_an_optimized_form_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The optimized form is laid out for this CPU's vector width and made by this ONNX
    Runtime: a cache shared with another machine, or kept across an upgrade, never runs it."""
    import onnxruntime

    kept = Path("cache/u2netp-0123-v2.onnx")
    here = optimized.cache_path(kept)
    monkeypatch.setattr(cpuinfo, "cpu_flags", lambda: frozenset({"sse4_2", "avx", "avx2"}))
    other_cpu = optimized.cache_path(kept)
    monkeypatch.setattr(onnxruntime, "__version__", "9.9.9")
    other_runtime = optimized.cache_path(kept)
    assert len({here, other_cpu, other_runtime}) == 3
    assert other_runtime.name.startswith("u2netp-0123-v2-opt-ort9.9.9-avx2-")


def test_a_start_removes_the_cache_files_no_start_can_use(
    onnx_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Older formats of these weights' graphs, optimized forms of another ONNX Runtime on this
    CPU and temp files an hour old go; everything another start could still use stays."""
    cache = tmp_path / "cache"
    cache.mkdir()
    export = exported.cache_path("u2netp", WEIGHTS, onnx_cache)
    (cache / export.name).write_bytes(exported.onnx_model("u2netp", WEIGHTS, onnx_cache))
    base = export.name.removesuffix(f"-v{exported.FORMAT}.onnx")
    ort_version, this_cpu = optimized.host_key().removeprefix("ort").split("-", 1)
    dead = [
        f"{base}-v1.onnx",  # the export's previous format
        f"{base}-v{exported.FORMAT}-int8-mixed-q1.onnx",  # int8-mixed's previous format
        f"{base}-v{exported.FORMAT}-opt-ort0.1.0-{this_cpu}.onnx",  # an older ONNX Runtime here
        f".{base}-v{exported.FORMAT}.onnx.0badc0de.tmp",  # a build killed mid-write
    ]
    alive = [
        f"{base}-v99.onnx",  # a newer hotfolder's
        f"{base}-v{exported.FORMAT}-opt-ort{ort_version}-avx512-0123456789ab.onnx",  # other CPU
        f"u2netp-{'0' * 24}-v1.onnx",  # other weights: maybe another configuration's
        f".{base}-v{exported.FORMAT}.onnx.1badc0de.tmp",  # being written now
        "notes.txt",
    ]
    for name in dead + alive:
        (cache / name).write_bytes(b"x")
    hour_ago = time.time() - 2 * 3600
    os.utime(cache / dead[-1], (hour_ago, hour_ago))
    (cache / f"{base}-v0.onnx").mkdir()  # not a file: left alone
    caplog.set_level(logging.INFO, logger="hotfolder")
    engine = OnnxEngine("u2netp", WEIGHTS, cache, cpu_threads=1, precision="fp32")
    engine.setup(warm_up=False)
    left = {p.name for p in cache.iterdir()}
    assert not left & set(dead)
    assert set(alive) | {export.name, f"{base}-v0.onnx"} <= left
    assert "removed 4 files no start can use from the model cache" in caplog.text
    assert engine.predict([np.zeros((40, 30, 3), np.uint8)])[0].shape == (40, 30)


def test_the_sweep_keeps_optimized_forms_of_a_newer_onnx_runtime_or_hotfolder(
    tmp_path: Path,
) -> None:
    """Another installation sharing the cache, with a newer ONNX Runtime or a newer hotfolder,
    loads these: removed, each of its starts would make its own again, and each of ours remove
    it again. Versions are compared as numbers (1.9 is older than 1.25)."""
    from hotfolder import quantized, sweep

    kept = exported.cache_path("u2netp", WEIGHTS, tmp_path)
    base, v, q = kept.stem.removesuffix(f"-v{exported.FORMAT}"), exported.FORMAT, quantized.FORMAT
    host = optimized.host_key()
    ort_version, this_cpu = host.removeprefix("ort").split("-", 1)
    major, minor, *_ = (int(n) for n in ort_version.split("."))
    alive = [
        f"{base}-v{v}-opt-ort{major}.{minor + 1}.0-{this_cpu}.onnx",
        f"{base}-v{v}-opt-ort{major + 1}.0.0-{this_cpu}.onnx",
        f"{base}-v{v}-opt-ortnightly-{this_cpu}.onnx",  # no release number to compare
        f"{base}-v{v + 1}-opt-ort0.1.0-{this_cpu}.onnx",  # a newer hotfolder, older runtime
        f"{base}-v{v}-int8-mixed-q{q + 1}-opt-ort0.1.0-{this_cpu}.onnx",
    ]
    dead = [f"{base}-v{v}-opt-ort1.9.0-{this_cpu}.onnx"]  # older than any supported runtime
    for name in alive + dead:
        (tmp_path / name).write_bytes(b"x")
    sweep.sweep(kept, host, (exported.FORMAT, quantized.FORMAT))
    assert {p.name for p in tmp_path.iterdir()} == set(alive)
