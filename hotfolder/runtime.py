"""Which runtime runs the model, and what the daemon needs of an engine, whichever runs it.

Two engines keep one contract (LitServe's: ``setup()`` loads and warms, ``predict(images)`` does
the tensor work): :class:`hotfolder.engine.MattingEngine` on PyTorch, for GPUs and the CPU
precisions only it has, and :class:`hotfolder.onnxengine.OnnxEngine` on ONNX Runtime, for fp32 on
the CPU, where it is faster and starts without importing PyTorch, and for int8-mixed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from hotfolder import cpuinfo
from hotfolder.config import INT8_MIXED, ModelConfig

TORCH = "torch"
ONNXRUNTIME = "onnxruntime"
RUNTIMES = ("auto", TORCH, ONNXRUNTIME)


class EngineError(Exception):
    """The engine cannot run as configured (device, precision or weights)."""


class Device(Protocol):
    """Where an engine runs: ``type`` is ``cpu`` or ``cuda`` (a ``torch.device`` is one)."""

    @property
    def type(self) -> str: ...


class Engine(Protocol):
    """What the daemon and the commands use of an engine."""

    arch: str
    load_seconds: float
    warmup_seconds: float
    on_split: Callable[[int], object]  # a batch did not fit in device memory and was split

    @property
    def device(self) -> Device: ...

    @property
    def precision(self) -> str: ...

    @property
    def runtime(self) -> str: ...

    def setup(self, warm_up: bool = True) -> None: ...

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]: ...


def on_cpu(model: ModelConfig) -> bool:
    """Whether ``model.device`` means the CPU: ``cpu``, or ``auto`` where the NVIDIA driver
    lists no GPU (known without importing PyTorch)."""
    return model.device == "cpu" or (model.device == "auto" and not cpuinfo.nvidia_gpu_present())


def choose(model: ModelConfig) -> str:
    """The runtime for ``model``: as configured, or for ``auto`` ONNX Runtime wherever the model
    runs in fp32 on the CPU (measured faster than PyTorch there, and the same mattes) and for
    int8-mixed (ONNX Runtime's alone), PyTorch everywhere else (GPUs, bf16 forms,
    torch.compile)."""
    if model.runtime != "auto":
        return model.runtime
    if model.precision == INT8_MIXED:
        return ONNXRUNTIME
    fp32 = model.precision in ("auto", "fp32")
    return ONNXRUNTIME if on_cpu(model) and fp32 and not model.compile else TORCH
