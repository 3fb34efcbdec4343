"""The CPU forms of the model: bf16 but for the layers that draw the edges, chosen by the CPU."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from hotfolder import cpuinfo, cpupaths
from hotfolder.engine import MIXED, EngineError, MattingEngine, is_mixed

from .conftest import WEIGHTS


def test_bf16_mixed_mattes_stay_within_2_of_255_of_fp32(
    engine: MattingEngine, photos: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    mixed = MattingEngine("u2netp", WEIGHTS, device="cpu", precision=MIXED)
    with caplog.at_level(logging.INFO, logger="hotfolder.engine"):
        mixed.setup(warm_up=False)
    assert f"(bf16-mixed, PyTorch {torch.__version__}; {cpuinfo.describe()})" in caplog.text
    images = [photos["chelsea"], photos["astronaut"]]
    for ours, reference in zip(mixed.predict(images), engine.predict(images), strict=True):
        assert ours.dtype == np.uint8
        assert ours.shape == reference.shape
        assert np.abs(ours.astype(np.int16) - reference).mean() <= 2


def test_bf16_mixed_runs_only_the_full_resolution_stages_in_bf16() -> None:
    mixed = MattingEngine("u2netp", WEIGHTS, device="cpu", precision=MIXED)
    mixed.setup(warm_up=False)
    x = torch.rand(1, 3, 320, 320)
    seen: dict[str, torch.dtype] = {}
    model = mixed._model
    assert model is not None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, o.dtype))
    with torch.inference_mode():
        assert model(x).dtype == torch.float32
    kept = {n for n, dtype in seen.items() if dtype == torch.float32}
    assert kept == {
        n for n in seen if n.startswith(tuple(f"model.{k}" for k in cpupaths.KEEP_FP32))
    }
    assert len(kept) < len(seen)  # the rest ran in bf16


def test_mixed_is_for_the_cpu_and_only_when_asked() -> None:
    with pytest.raises(EngineError, match="for the CPU"):
        is_mixed(MIXED, torch.device("cuda"))
    assert is_mixed(MIXED, torch.device("cpu"))
    assert not is_mixed("fp32", torch.device("cpu"))
    assert not is_mixed("auto", torch.device("cpu"))
