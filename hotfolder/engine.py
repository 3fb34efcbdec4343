"""The resident matting model: loaded and warmed once, then fed batches of decoded images.

The contract is LitServe's: ``setup()`` loads and warms; ``predict(images)`` is pure tensor work.
Pre- and post-processing run on the engine's device from uint8 input, per image, as rembg does
for U²-Net models: antialiased Lanczos resize to 320×320, scale by the image's maximum, ImageNet
mean/std; afterwards each saliency map is min–max normalised on its own (never across the batch) and
resized back to its image's size.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from hotfolder import cpuinfo, cpupaths, cudagraphs, models
from hotfolder.resample import resize_lanczos
from hotfolder.runtime import TORCH, EngineError
from hotfolder.turns import Turns

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The CPU form that keeps fp32's mattes: bf16 but for the layers that draw the edges.
MIXED = "bf16-mixed"
# PyTorch's own choice (one per physical core, or OMP_NUM_THREADS), read before an engine on the
# CPU sets the process to one thread per operation.
DEFAULT_CPU_THREADS = torch.get_num_threads()


def resolve_device(spec: str) -> torch.device:
    """``auto`` takes the first CUDA GPU when there is one; ``cuda``/``cuda:N`` never fall back."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise EngineError(
            f"model.device: {spec!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise EngineError(f"model.device: {spec!r} is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise EngineError(
            f"model.device is {spec!r} but no CUDA GPU is available to PyTorch "
            "(check the driver with nvidia-smi, or set model.device: auto to allow the CPU)"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise EngineError(f"model.device is {spec!r} but this machine has {count} GPU(s)")
    return device


def resolve_precision(spec: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp16 on a GPU (max |Δ| 0.007 against fp32) and fp32 on the CPU."""
    if spec == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if spec not in PRECISIONS:
        raise EngineError(
            f"model.precision: {spec!r} is not one of auto, fp32, fp16, bf16, {MIXED}"
        )
    if spec == "fp16" and device.type == "cpu":
        raise EngineError("model.precision: fp16 needs a GPU; use fp32 or bf16 on the CPU")
    return PRECISIONS[spec]


def is_mixed(spec: str, device: torch.device) -> bool:
    """Whether the model runs as ``bf16-mixed`` (see :mod:`hotfolder.cpupaths`): only when asked.
    ``auto`` keeps fp32 on every CPU: on the eval photos bf16-mixed holds every metric within
    0.5 % of fp32, but one photo's matte moves by 2.5/255 on average, over the 2/255 allowed."""
    if spec != MIXED:
        return False
    if device.type != "cpu":
        raise EngineError(f"model.precision: {MIXED} is for the CPU; use fp16 on a GPU")
    return True


class MattingEngine:
    """One model resident on one device, on PyTorch. ``predict`` may be called from several
    threads: they take turns, in the order they called."""

    runtime = TORCH

    def __init__(
        self,
        arch: str,
        weights: Path,
        device: str = "auto",
        precision: str = "auto",
        flip_average: bool = False,
        cpu_threads: int = 0,
        max_batch: int = 16,
        cuda_graphs: bool = True,
        compile_cache: Path | None = None,
    ) -> None:
        self.arch = arch
        self.weights = weights
        self.device = resolve_device(device)
        self.mixed = is_mixed(precision, self.device)
        # A mixed model takes and gives float32; its inside is its own business.
        self.dtype = torch.float32 if self.mixed else resolve_precision(precision, self.device)
        self.flip_average = flip_average
        self.load_seconds = 0.0
        self.warmup_seconds = 0.0
        # A GPU runs a batch whole; ``chunk`` only shrinks when a batch does not fit.
        self.chunk = 1 << 16
        # On a CPU, images run side by side, one per core, each single-threaded: U²-Net-P's
        # small convolutions scale poorly across cores, and a batch's activations overflow the
        # caches. 4.5 img/s on 2 cores, against 3.6 for one image on two threads and 2.3 for
        # batches of 16.
        self.cpu_threads = cpu_threads or DEFAULT_CPU_THREADS
        self._pool: ThreadPoolExecutor | None = None
        # On a GPU: the batch sizes to capture as CUDA graphs (flip-averaging doubles a batch),
        # and where torch.compile keeps its work (None: no compiling). Compiling takes minutes
        # per batch size, so a compiled model gets one graph, of the largest batch, that every
        # batch is padded to: at 3 600 img/s a full batch of 64 takes 18 ms.
        largest = max_batch * (2 if flip_average else 1)
        use_graphs = cuda_graphs and self.device.type == "cuda"
        sizes = [largest] if compile_cache is not None else cudagraphs.batch_sizes(largest)
        self.graph_sizes = sizes if use_graphs else []
        self.compile_cache = compile_cache
        self._graphed: cudagraphs.GraphedModel | None = None
        self.on_split: Callable[[int], object] = lambda size: None  # a batch did not fit
        self._model: torch.nn.Module | None = None
        self._turns = Turns()
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(shape)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(shape)

    @property
    def precision(self) -> str:
        if self.mixed:
            return MIXED
        return next(name for name, dtype in PRECISIONS.items() if dtype == self.dtype)

    def setup(self, warm_up: bool = True) -> None:
        """Load the weights onto the device and, with ``warm_up``, run a warm-up batch, so the
        first real file pays no start-up cost (a daemon's readiness waits for it; a one-shot
        command has nobody waiting, and its first batch warms the model as well)."""
        started = time.perf_counter()
        try:
            model = models.load(self.arch, self.weights)
        except models.WeightsError as exc:
            raise EngineError(str(exc)) from exc
        # channels_last is faster for convolutions on both GPUs and CPUs; the typing stubs lack
        # Module.to's memory_format keyword.
        self._model = model.to(  # type: ignore[call-overload]
            self.device, self.dtype, memory_format=torch.channels_last
        )
        if self.mixed:
            self._model = cpupaths.bf16_except(self._model, cpupaths.KEEP_FP32)
        self.load_seconds = time.perf_counter() - started
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # process-wide: parallelism comes from the pool instead
            if self.cpu_threads > 1:
                self._pool = ThreadPoolExecutor(self.cpu_threads, thread_name_prefix="model")
        started = time.perf_counter()
        if self.compile_cache is not None:
            self._model = compiled(self._model, self.compile_cache, len(self.graph_sizes))
        if self.graph_sizes:
            self._graphed = cudagraphs.GraphedModel(
                self._model, self.graph_sizes, self.device, self.dtype
            )
        if warm_up:
            self.predict([np.zeros((models.INPUT_SIZE, models.INPUT_SIZE, 3), np.uint8)])
        self.warmup_seconds = time.perf_counter() - started
        log.info(
            "model %s loaded on %s (%s, PyTorch %s%s) in %.2f s, warm-up %.2f s%s%s",
            self.arch,
            self.device,
            self.precision,
            torch.__version__,
            f"; {cpuinfo.describe()}" if self.device.type == "cpu" else "",
            self.load_seconds,
            self.warmup_seconds,
            ", compiled" if self.compile_cache is not None else "",
            f", CUDA graphs for {self._graphed.sizes} images" if self._graphed else "",
        )

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Alpha mattes (H, W) uint8 for RGB images (H, W, 3) uint8 of any sizes: as one batch
        on a GPU, side by side on the CPU's cores."""
        if self._model is None:
            raise EngineError("predict() before setup()")
        with self._turns:
            return self._spread(self._predict_batch, images)

    def run_model(self, x: torch.Tensor) -> torch.Tensor:
        """The model alone over a preprocessed (N, 3, 320, 320) batch, spread over the device
        as ``predict`` spreads images: for benchmarks."""
        if self._model is None:
            raise EngineError("run_model() before setup()")
        with self._turns:
            parts = self._spread(self._infer_batch, list(torch.split(x, 1)) if self._pool else [x])
        return torch.cat(parts)

    def _spread(self, work: Callable[[Sequence[T]], list[R]], items: Sequence[T]) -> list[R]:
        """``work`` over all ``items`` at once; on the CPU, over one item per core side by side,
        each single-threaded (a lone item gets every core)."""
        if self._pool is None or len(items) <= 1:
            if self._pool is not None:
                torch.set_num_threads(self.cpu_threads)
            return work(items)
        torch.set_num_threads(1)
        return [out for outs in self._pool.map(work, [[item] for item in items]) for out in outs]

    @torch.inference_mode()
    def _predict_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        if not images:
            return []
        batch = torch.cat([self._preprocess(image) for image in images])
        saliency = self._infer(batch)
        alphas = [
            self._postprocess(saliency[i : i + 1], image.shape[:2])
            for i, image in enumerate(images)
        ]
        return self._download(alphas)

    @torch.inference_mode()
    def _infer_batch(self, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self._infer(torch.cat(list(parts)))]

    def _preprocess(self, image: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(image)
        if self.device.type == "cuda":
            # From page-locked memory the upload is queued and this thread goes on to the next
            # image; PyTorch keeps the buffer until the copy is done.
            pixels = pixels.pin_memory()
        pixels = pixels.to(self.device, non_blocking=True)
        x = resize_lanczos(pixels.permute(2, 0, 1).float(), (models.INPUT_SIZE, models.INPUT_SIZE))
        # As rembg does: divide by the image's own maximum, not by 255.
        x = x.unsqueeze(0) / x.amax().clamp_min(1.0)
        return (x - self._mean) / self._std

    def _infer(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.dtype).contiguous(memory_format=torch.channels_last)
        if not self.flip_average:
            return self._run_chunks(x)
        plain, flipped = self._run_chunks(torch.cat((x, x.flip(-1)))).chunk(2)
        return (plain + flipped.flip(-1)) / 2

    def _run_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """The model over ``x``: replayed from a CUDA graph when one holds it, else in chunks of
        at most ``self.chunk`` images."""
        if self._graphed is not None:
            replayed = self._graphed(x)
            if replayed is not None:
                return replayed.float()
        outputs = [self._run_chunk(part) for part in torch.split(x, self.chunk)]
        return torch.cat(outputs).float()

    def _run_chunk(self, x: torch.Tensor) -> torch.Tensor:
        """A chunk that does not fit in device memory is halved until it does; later batches
        use the size that fitted. Only a single image that does not fit is an error."""
        assert self._model is not None
        try:
            out: torch.Tensor = self._model(x)
            return out
        except torch.cuda.OutOfMemoryError:
            if len(x) == 1:
                raise
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(x) // 2
        self.chunk = min(self.chunk, half)
        self.on_split(len(x))
        log.warning("out of device memory for %d images; running them %d at a time", len(x), half)
        return torch.cat([self._run_chunk(x[:half]), self._run_chunk(x[half:])])

    def _postprocess(self, saliency: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        low, high = saliency.amin(), saliency.amax()
        normalised = (saliency - low) / (high - low).clamp_min(1e-6)
        alpha = F.interpolate(normalised, size=size, mode="bicubic", align_corners=False)
        return alpha.clamp_(0, 1).mul_(255).round_().to(torch.uint8)[0, 0]

    def _download(self, alphas: list[torch.Tensor]) -> list[np.ndarray]:
        """Mattes to host memory: on a GPU every copy is queued first, then one wait, instead
        of a stop for each image."""
        if self.device.type == "cuda":
            alphas = [alpha.to("cpu", non_blocking=True) for alpha in alphas]
            torch.cuda.current_stream(self.device).synchronize()
        return [alpha.numpy() for alpha in alphas]


def compiled(model: torch.nn.Module, cache: Path, shapes: int) -> torch.nn.Module:
    """``model`` through torch.compile with autotuned kernels. Compiling takes minutes; its
    results (generated kernels, autotuning choices) are kept in ``cache`` so that only the first
    start on a machine pays. One compilation per batch shape: ``shapes`` of them."""
    cache.mkdir(parents=True, exist_ok=True)
    # Inductor reads its cache folder from the environment when it first needs it.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    import torch._dynamo.config

    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, shapes + 1)
    # The graphs are ours (cudagraphs.py): max-autotune's own would be captured inside them.
    result: torch.nn.Module = torch.compile(  # type: ignore[assignment]
        model, mode="max-autotune-no-cudagraphs", dynamic=False
    )
    return result
