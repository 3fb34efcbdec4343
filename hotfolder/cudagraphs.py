"""The model captured as CUDA graphs over a fixed set of batch sizes.

One forward pass of U²-Net-P launches about 600 small kernels; on a fast GPU Python's launching
them is the bottleneck, not the arithmetic. A CUDA graph replays the whole pass with one launch.
Graphs have fixed shapes, so a few batch sizes are captured during warm-up (before the daemon
reports ready: no cold start) and a batch runs in the smallest graph that holds it. The rows it
does not fill hold whatever the previous batch left there; every image is computed on its own
(there is no batch-wide operation in the model), so they cannot change the real rows' results.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from hotfolder.models import INPUT_SIZE

log = logging.getLogger(__name__)


def batch_sizes(largest: int) -> list[int]:
    """1, 2, 4, 8, then steps of a half (12, 16, 24, 32, 48, 64, …) up to the first size that
    holds ``largest``: a batch never pads by more than half of itself beyond 8."""
    sizes, power = [1, 2, 4, 8], 8
    while sizes[-1] < largest:
        sizes += [power * 3 // 2, power * 2]
        power *= 2
    return [s for s in sizes if s < largest] + [next(s for s in sizes if s >= largest)]


def smallest_holding(sizes: list[int], count: int) -> int | None:
    """The smallest of ``sizes`` (ascending) that holds ``count`` images; None if none does."""
    return next((size for size in sizes if size >= count), None)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor  # the graph reads its batch from here
    outputs: torch.Tensor  # and writes its result here, on every replay


class GraphedModel:
    """``model`` replayed from CUDA graphs for batches of up to ``max(sizes)`` images."""

    def __init__(
        self, model: torch.nn.Module, sizes: list[int], device: torch.device, dtype: torch.dtype
    ) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        # One memory pool for all graphs: they never run at the same time, and each replay's
        # result is copied out before the next, so their scratch memory can be shared.
        self._memory = torch.cuda.graph_pool_handle()
        self._captured: dict[int, _Captured] = {}
        for size in sorted(sizes, reverse=True):  # the largest first, so the pool fits all
            try:
                self._captured[size] = self._capture(size)
            except torch.cuda.OutOfMemoryError:
                log.warning("no CUDA graph for %d images: out of device memory", size)
                torch.cuda.empty_cache()
        self.sizes = sorted(self._captured)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """The model's output for ``x``, or None when ``x`` is larger than every graph."""
        size = smallest_holding(self.sizes, len(x))
        if size is None:
            return None
        captured = self._captured[size]
        captured.inputs[: len(x)].copy_(x)
        captured.graph.replay()
        return captured.outputs[: len(x)].clone()

    def _capture(self, size: int) -> _Captured:
        inputs = torch.zeros(size, 3, INPUT_SIZE, INPUT_SIZE, device=self.device, dtype=self.dtype)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        # Capturing needs the kernels already chosen and loaded: run the shape twice on a side
        # stream first, as PyTorch's documentation prescribes.
        side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                self.model(inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._memory), torch.inference_mode():
            outputs = self.model(inputs)
        return _Captured(graph, inputs, outputs)
