"""The resident engine: devices, precisions, per-image processing in mixed batches, rembg parity."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rembg import new_session, remove

from hotfolder import cudagraphs
from hotfolder.engine import EngineError, MattingEngine, resolve_device, resolve_precision
from hotfolder.resample import resize_lanczos

from .conftest import WEIGHTS


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_mixed_sizes_in_one_batch_match_one_by_one(
    batch_engine: MattingEngine, photos: dict[str, np.ndarray]
) -> None:
    images = list(photos.values())
    together = batch_engine.predict(images)
    for image, alpha in zip(images, together, strict=True):
        assert alpha.shape == image.shape[:2]
        assert alpha.dtype == np.uint8
        alone = batch_engine.predict([image])[0]
        # Normalisation is per image: batch-mates never change an image's matte.
        assert np.abs(alpha.astype(int) - alone.astype(int)).max() <= 1


def test_images_side_by_side_on_the_cpu_match_one_batch(
    engine: MattingEngine, batch_engine: MattingEngine, photos: dict[str, np.ndarray]
) -> None:
    images = [*photos.values(), photos["chelsea"][::-1].copy()]  # an odd count: a core idles
    side_by_side = engine.predict(images)
    one_batch = batch_engine.predict(images)
    assert len(side_by_side) == len(images)
    for a, b in zip(side_by_side, one_batch, strict=True):
        assert a.shape == b.shape
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert engine.predict([]) == []


def test_each_matte_uses_its_full_range(
    engine: MattingEngine, photos: dict[str, np.ndarray]
) -> None:
    # A dark photo beside a bright one: per-image min–max keeps both spanning 0–255.
    dark = (photos["chelsea"] // 4).astype(np.uint8)
    for alpha in engine.predict([dark, photos["astronaut"]]):
        assert alpha.min() <= 2
        assert alpha.max() >= 253


def test_matches_rembg_on_real_photos(engine: MattingEngine, photos: dict[str, np.ndarray]) -> None:
    session = new_session("u2netp")
    ours = engine.predict(list(photos.values()))
    for (name, photo), alpha in zip(photos.items(), ours, strict=True):
        theirs = np.asarray(remove(Image.fromarray(photo), session=session, only_mask=True))
        assert mean_abs_diff(alpha, theirs) <= 2, name


def test_flip_average_makes_mattes_mirror_symmetric(
    engine: MattingEngine, photos: dict[str, np.ndarray]
) -> None:
    averaging = MattingEngine("u2netp", WEIGHTS, device="cpu", flip_average=True)
    averaging.setup()
    photo = photos["astronaut"]
    mirrored = np.ascontiguousarray(photo[:, ::-1])
    a, b = averaging.predict([photo, mirrored])
    assert np.abs(a.astype(int) - b[:, ::-1].astype(int)).max() <= 1
    # The plain model is not symmetric: averaging really changes the matte.
    plain, plain_mirrored = engine.predict([photo, mirrored])
    assert mean_abs_diff(plain, plain_mirrored[:, ::-1]) > 1


def test_lanczos_resize_matches_pillow(photos: dict[str, np.ndarray]) -> None:
    for photo in photos.values():
        expected = np.asarray(Image.fromarray(photo).resize((320, 320), Image.LANCZOS))
        got = resize_lanczos(torch.from_numpy(photo).permute(2, 0, 1).float(), (320, 320))
        diff = np.abs(got.permute(1, 2, 0).numpy() - expected)
        assert diff.max() <= 1  # Pillow's fixed-point arithmetic rounds a few pixels the other way


def test_auto_picks_the_cpu_without_a_gpu_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    caplog.set_level(logging.INFO, logger="hotfolder")
    engine = MattingEngine("u2netp", WEIGHTS, device="auto")
    engine.setup()
    assert engine.device == torch.device("cpu")
    assert engine.precision == "fp32"
    assert f"loaded on cpu (fp32, PyTorch {torch.__version__}; CPU " in caplog.text  # which path


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_asking_for_a_gpu_without_one_is_an_error(device: str) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(EngineError, match="no CUDA GPU is available"):
        resolve_device(device)


@pytest.mark.parametrize("device", ["tpu", "gpu0", "mps"])
def test_unknown_devices_are_refused(device: str) -> None:
    with pytest.raises(EngineError, match=r"model\.device"):
        resolve_device(device)


def test_precisions() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == torch.float32
    assert resolve_precision("auto", cuda) == torch.float16
    assert resolve_precision("bf16", cpu) == torch.bfloat16
    with pytest.raises(EngineError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(EngineError, match="not one of"):
        resolve_precision("int8", cpu)


def test_missing_weights_are_a_clear_error(tmp_path: Path) -> None:
    engine = MattingEngine("u2netp", tmp_path / "nowhere.safetensors", device="cpu")
    with pytest.raises(EngineError, match=r"nowhere\.safetensors: weights file not found"):
        engine.setup()


def test_predict_before_setup_is_an_error() -> None:
    with pytest.raises(EngineError, match="before setup"):
        MattingEngine("u2netp", WEIGHTS, device="cpu").predict([np.zeros((4, 4, 3), np.uint8)])


@pytest.mark.gpu
def test_fp16_on_the_gpu_matches_fp32(photos: dict[str, np.ndarray]) -> None:
    half = MattingEngine("u2netp", WEIGHTS, device="cuda", precision="fp16")
    full = MattingEngine("u2netp", WEIGHTS, device="cuda", precision="fp32")
    half.setup()
    full.setup()
    images = list(photos.values())
    for a, b in zip(half.predict(images), full.predict(images), strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


@pytest.mark.gpu
def test_gpu_matches_cpu(engine: MattingEngine, photos: dict[str, np.ndarray]) -> None:
    gpu = MattingEngine("u2netp", WEIGHTS, device="cuda", precision="fp32")
    gpu.setup()
    images = list(photos.values())
    for a, b in zip(gpu.predict(images), engine.predict(images), strict=True):
        assert mean_abs_diff(a, b) <= 0.5


@pytest.mark.gpu
def test_cuda_graphs_give_the_eager_models_mattes(photos: dict[str, np.ndarray]) -> None:
    graphed = MattingEngine("u2netp", WEIGHTS, device="cuda", max_batch=8)
    eager = MattingEngine("u2netp", WEIGHTS, device="cuda", max_batch=8, cuda_graphs=False)
    graphed.setup()
    eager.setup()
    assert graphed._graphed is not None
    assert graphed._graphed.sizes == [1, 2, 4, 8]
    assert eager._graphed is None
    images = [*photos.values(), *(p[::-1].copy() for p in photos.values()), photos["coffee"]]
    # Padded batches (3 in the graph for 4, 5 in 8) after fuller ones leave stale rows behind;
    # 9 is beyond every graph and runs eagerly.
    for count in (4, 8, 3, 5, 1, 9):
        for a, b in zip(
            graphed.predict(images[:count]), eager.predict(images[:count]), strict=True
        ):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_compiled_model_gives_the_eager_mattes_and_keeps_its_kernels(
    tmp_path: Path, batch_engine: MattingEngine, photos: dict[str, np.ndarray]
) -> None:
    """torch.compile on the CPU (a minute): the same mattes, and a second start finds the
    compiled kernels in the cache folder instead of compiling again."""
    cache = tmp_path / "kernels"
    compiled = MattingEngine("u2netp", WEIGHTS, device="cpu", cpu_threads=1, compile_cache=cache)
    compiled.setup()
    image = [photos["coffee"]]
    assert (
        np.abs(compiled.predict(image)[0].astype(int) - batch_engine.predict(image)[0]).max() <= 1
    )
    second_start = (
        "import sys; from pathlib import Path; from torch._dynamo.utils import counters\n"
        "from hotfolder.engine import MattingEngine\n"
        "engine = MattingEngine('u2netp', Path(sys.argv[1]), device='cpu', cpu_threads=1,"
        " compile_cache=Path(sys.argv[2]))\n"
        "engine.setup()\n"
        "print('hits', counters['inductor']['fxgraph_cache_hit'],"
        " 'misses', counters['inductor']['fxgraph_cache_miss'])\n"
    )
    result = subprocess.run([sys.executable, "-c", second_start, str(WEIGHTS), str(cache)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "hits 1 misses 0" in result.stdout, result.stdout + result.stderr


def test_cuda_graph_batch_sizes() -> None:
    assert cudagraphs.batch_sizes(1) == [1]
    assert cudagraphs.batch_sizes(3) == [1, 2, 4]
    assert cudagraphs.batch_sizes(16) == [1, 2, 4, 8, 12, 16]
    assert cudagraphs.batch_sizes(64) == [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]
    assert cudagraphs.batch_sizes(100)[-2:] == [96, 128]
    sizes = cudagraphs.batch_sizes(64)
    assert [cudagraphs.smallest_holding(sizes, n) for n in (1, 3, 9, 17, 64)] == [1, 4, 12, 24, 64]
    assert cudagraphs.smallest_holding(sizes, 65) is None
    assert MattingEngine("u2netp", WEIGHTS, device="cpu").graph_sizes == []  # CUDA only


class SmallDevice(torch.nn.Module):
    """The real model on a device that runs out of memory above ``limit`` images at a time."""

    def __init__(self, model: torch.nn.Module, limit: int = 2) -> None:
        super().__init__()
        self.model = model
        self.limit = limit
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        out: torch.Tensor = self.model(x)
        return out


def test_a_batch_that_does_not_fit_is_split_and_gives_the_same_mattes(
    engine: MattingEngine, photos: dict[str, np.ndarray]
) -> None:
    images = [*photos.values(), photos["coffee"][::-1].copy()]  # 5 images
    expected = engine.predict(images)
    small = MattingEngine("u2netp", WEIGHTS, device="cpu", cpu_threads=1)  # batches, as on a GPU
    small.setup()
    assert small._model is not None
    device = SmallDevice(small._model)
    small._model = device
    small.chunk = 1 << 16  # as on a GPU: the whole batch at once
    splits: list[int] = []
    small.on_split = splits.append
    got = small.predict(images)
    for a, b in zip(got, expected, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert splits == [5, 3]  # 5 → 2 + 3, then 3 → 1 + 2
    assert small.chunk == 1
    assert device.calls == [5, 2, 3, 1, 2]
    device.calls.clear()
    small.predict(images[:2])
    assert device.calls == [1, 1]  # later batches start at the size that fitted


def test_a_single_image_that_does_not_fit_is_an_error() -> None:
    small = MattingEngine("u2netp", WEIGHTS, device="cpu", cpu_threads=1)
    small.setup()
    assert small._model is not None
    small._model = SmallDevice(small._model, limit=0)
    small.chunk = 1 << 16
    with pytest.raises(torch.cuda.OutOfMemoryError):
        small.predict([np.zeros((8, 8, 3), np.uint8)] * 3)
