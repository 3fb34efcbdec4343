"""The resident matting model on ONNX Runtime: the engine for the CPU, without PyTorch.

Same contract and same mattes as :class:`hotfolder.engine.MattingEngine` on the CPU (within two
levels: Pillow resizes in fixed point, PyTorch in float), in fp32, from the same safetensors
weights (exported once, see :mod:`hotfolder.exported`); or, asked for, in the int8-mixed form of
:mod:`hotfolder.quantized` (u2netp only). On the 2-core AVX2 development machine
the model alone takes 0.59 s per 320×320 image on one thread against PyTorch's 0.71 s, and a
one-shot command starts without PyTorch's 1.6 s import.

Pre- and post-processing are rembg's for U²-Net models: Pillow's antialiased Lanczos resize to
320×320 (what :func:`hotfolder.resample.resize_lanczos` reproduces on a GPU), scale by the
image's maximum, ImageNet mean/std; each saliency map min–max normalised on its own, then
resized back with bicubic interpolation (a = −0.75, half-pixel centres, as PyTorch's).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from hotfolder import cpuinfo, exported, optimized, quantized, sweep
from hotfolder.runtime import EngineError
from hotfolder.turns import Turns

log = logging.getLogger(__name__)

RUNTIME = "onnxruntime"
INPUT_SIZE = 320  # models.INPUT_SIZE, without importing PyTorch
PRECISIONS = ("auto", "fp32", quantized.PRECISION)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclass(frozen=True)
class HostCPU:
    """The device this engine runs on, as the daemon describes an engine's device."""

    type: str = "cpu"

    def __str__(self) -> str:
        return self.type


class OnnxEngine:
    """One model resident in ONNX Runtime on the CPU. ``predict`` may be called from several
    threads: they take turns, in the order they called. Raises EngineError (from ``setup``)
    when the model cannot be loaded or exported."""

    runtime = RUNTIME
    device = HostCPU()

    def __init__(
        self,
        arch: str,
        weights: Path,
        cache: Path,
        flip_average: bool = False,
        cpu_threads: int = 0,
        precision: str = "fp32",
    ) -> None:
        if precision not in PRECISIONS:
            raise EngineError(
                f"model.precision: {precision!r} on ONNX Runtime is not one of "
                f"{', '.join(PRECISIONS)}"
            )
        self.arch = arch
        self.asked = precision
        # "auto" is settled at setup(), from the weights and the CPU (:func:`quantized.suits`).
        self.precision = "fp32" if precision == "auto" else precision
        self.weights = weights
        self.cache = cache
        self.flip_average = flip_average
        # Images run side by side, one per core, each on one thread, as the PyTorch engine runs
        # them on a CPU (and for the same reasons); a lone image gets every core.
        self.cpu_threads = cpu_threads or cpuinfo.physical_cores()
        self.load_seconds = 0.0
        self.warmup_seconds = 0.0
        self.on_split: Callable[[int], object] = lambda size: None  # never: no device memory
        self._turns = Turns()
        self._alone: Any = None  # onnxruntime.InferenceSession on every core
        # On one thread, made when images first come several at a time (one photo at a time,
        # as a one-shot command of one file, never needs it).
        self._side_by_side: Any = None
        self._graph = b""
        self._graph_optimized = False  # _graph is ONNX Runtime's optimized form (optimized.py)
        self._pool: ThreadPoolExecutor | None = None

    def setup(self, warm_up: bool = True) -> None:
        """Load the graph (exporting it first if the cache lacks it) and, with ``warm_up``,
        run one image so that the first real one pays no start-up cost."""
        started = time.perf_counter()
        # The weights are hashed (which releases the GIL) while ONNX Runtime is imported (which
        # holds it): 0.015 s less before a one-shot command's first photo.
        hashing = ThreadPoolExecutor(1, thread_name_prefix="hash")
        digest = hashing.submit(exported.weights_digest, self.weights)
        hashing.shutdown(wait=False)
        import onnxruntime as ort

        self._alone, self._graph = self._load(digest)
        if self.cpu_threads > 1:
            self._pool = ThreadPoolExecutor(self.cpu_threads, thread_name_prefix="model")
        self.load_seconds = time.perf_counter() - started
        started = time.perf_counter()
        if warm_up:  # alone, and side by side: each session's first run allocates its memory
            blank = np.zeros((INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
            self.predict([blank])
            self.predict([blank] * self.cpu_threads)
        self.warmup_seconds = time.perf_counter() - started
        log.info(
            "model %s loaded on cpu (%s, ONNX Runtime %s; %s) in %.2f s, warm-up %.2f s",
            self.arch, self.precision, ort.__version__, cpuinfo.describe(), self.load_seconds,
            self.warmup_seconds,
        )  # fmt: skip

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Alpha mattes (H, W) uint8 for RGB images (H, W, 3) uint8 of any sizes, side by side
        on the CPU's cores."""
        if self._alone is None:
            raise EngineError("predict() before setup()")
        with self._turns:
            if self._pool is None or len(images) <= 1:
                return [self._matte(image, self._alone) for image in images]
            if self._side_by_side is None:
                graph, self._graph = self._graph, b""
                self._side_by_side = session(graph, 1, optimized=self._graph_optimized)
            side_by_side = self._side_by_side
            return list(self._pool.map(lambda im: self._matte(im, side_by_side), images))

    def _load(self, hashed: Future[str]) -> tuple[Any, bytes]:
        """The graph's session on every core, and the graph, for the weights of sha256
        ``hashed``. A cached graph that ONNX Runtime cannot load (damaged since it was
        written), or that is not this model's, is made again: an int8-mixed one first from the
        kept fp32 export, which is exported again only when that fails too."""
        try:
            digest = hashed.result()
        except OSError as exc:
            raise EngineError(f"model {self.arch}: {exc}") from exc
        if self.asked == "auto":
            self.precision = self._auto(digest)
        try:
            loaded = self._load_form(digest)
        except EngineError as exc:
            unbuilt = isinstance(exc.__cause__, quantized.QuantizeError)
            if not (unbuilt and self.asked == "auto" and self.precision == quantized.PRECISION):
                raise
            # auto promises a working model first and speed second.
            log.warning("precision auto: fp32, since the %s form cannot be made: %s",
                        quantized.PRECISION, exc)  # fmt: skip
            self.precision = "fp32"
            loaded = self._load_form(digest)
        graph = exported.cache_path(self.arch, self.weights, self.cache, digest)
        sweep.sweep(graph, optimized.host_key(), (exported.FORMAT, quantized.FORMAT))
        return loaded

    def _load_form(self, digest: str) -> tuple[Any, bytes]:
        """``_load`` for this engine's settled form (``self.precision``)."""
        int8 = self.precision == quantized.PRECISION
        path = (quantized if int8 else exported).cache_path(
            self.arch, self.weights, self.cache, digest
        )
        fast = optimized.cache_path(path)
        kept = self._load_optimized(fast, digest)
        if kept is not None:
            return kept
        with optimized.scratch() as save_as:
            alone, model = self._load_graph(path, digest, save_as)
            if save_as is not None:
                optimized.keep_written(fast, save_as)
        return alone, model

    def _load_optimized(self, path: Path, digest: str) -> tuple[Any, bytes] | None:
        """The session on every core of the optimized form kept as ``path`` and that form, or
        None when there is none, or it is damaged or not this model's (it is made again)."""
        data = exported.read_kept(path, "optimized model")
        if data is None:
            return None
        alone, problem = self._checked(data, digest, optimized=True)
        if alone is not None:
            self._graph_optimized = True
            return alone, data
        log.warning("the optimized model %s %s; making it again", path, problem)
        return None

    def _checked(self, graph: bytes, digest: str, **options: Any) -> tuple[Any, str]:
        """A session on every core of the serialized ``graph`` (``options`` as :func:`session`
        takes them) and '' when it is this model's in this engine's form; else None and what
        is wrong with it."""
        try:
            alone = session(graph, self.cpu_threads, **options)
        except Exception as exc:  # ONNX Runtime raises several pybind11 types for a bad graph
            return None, f"is damaged ({exc})"
        wrong = exported.mismatch(alone, self.arch, digest, self.precision)
        return (alone, "") if wrong is None else (None, f"is not this model's: {wrong}")

    def _load_graph(self, path: Path, digest: str, save_as: Path | None) -> tuple[Any, bytes]:
        """The session on every core of the cached graph ``path`` (made again where it must
        be, see ``_load``), and the graph; ONNX Runtime writes its optimized form to
        ``save_as`` when given."""
        int8 = self.precision == quantized.PRECISION
        # (make the graph again, export the model again): an int8-mixed graph is first built
        # again from the kept export, which is exported again only when that fails too.
        attempts = [(False, False), *([(True, False)] if int8 else []), (True, True)]
        export_suspect = False  # the kept export failed to build from: only a new one helps
        for again, export_again in attempts:
            if export_suspect and not export_again:
                continue
            last = export_again
            try:
                model = self._serialized(digest, again, export_again)
            except quantized.QuantizeError as exc:
                if last or self.arch != quantized.ARCH:
                    raise EngineError(f"model {self.arch}: {exc}") from exc
                # The kept fp32 export it is built from may be damaged: export it again.
                source = exported.cache_path(self.arch, self.weights, self.cache, digest)
                log.warning("cannot build the %s form from %s (%s); exporting it again",
                            self.precision, source, exc)  # fmt: skip
                export_suspect = True
                continue
            except (OSError, exported.ExportError) as exc:
                raise EngineError(f"model {self.arch}: {exc}") from exc
            alone, problem = self._checked(model, digest, save_as=save_as)
            if alone is not None:
                return alone, model
            if last:
                raise EngineError(f"model {self.arch}: the graph just exported {problem}")
            log.warning("the cached model %s %s; making it again", path, problem)
        raise AssertionError("unreachable")

    def _auto(self, digest: str) -> str:
        """The form ``precision: auto`` means for the weights of sha256 ``digest`` on this CPU,
        with a word on why u2netp stays fp32 (the README promises int8-mixed on the CPU)."""
        isa = cpuinfo.vector_isa()
        if quantized.suits(self.arch, digest, isa):
            return quantized.PRECISION
        if self.arch == quantized.ARCH:
            why = (
                f"this CPU ({isa}; it is faster on {' and '.join(quantized.FASTER_ON)})"
                if digest == quantized.CALIBRATED_WEIGHTS
                else f"weights other than the shipped ones it is calibrated for ({self.weights})"
            )
            log.info("precision auto: fp32 rather than %s, for %s", quantized.PRECISION, why)
        return "fp32"

    def _serialized(self, digest: str, again: bool, export_again: bool) -> bytes:
        """The serialized graph in this engine's form: from the cache, or made ``again`` (from
        the kept export, or from the model exported again with ``export_again``)."""
        if self.precision == quantized.PRECISION:
            return quantized.onnx_model(
                self.arch, self.weights, self.cache, again, digest, export_again
            )
        return exported.onnx_model(self.arch, self.weights, self.cache, again, digest)

    def _matte(self, image: np.ndarray, session: Any) -> np.ndarray:
        x = preprocess(image)
        if self.flip_average:
            pair = np.concatenate((x, x[..., ::-1]))
            plain, flipped = session.run([exported.OUTPUT], {exported.INPUT: pair})[0]
            saliency = (plain[0] + flipped[0, :, ::-1]) / 2
        else:
            saliency = session.run([exported.OUTPUT], {exported.INPUT: x})[0][0, 0]
        return postprocess(saliency, image.shape[:2])


def session(
    model: bytes, threads: int, optimized: bool = False, save_as: Path | None = None
) -> Any:
    """An ONNX Runtime session of the graph ``model`` computing on ``threads`` threads.
    ``optimized``: ``model`` is ONNX Runtime's optimized form (:mod:`hotfolder.optimized`),
    run as it is; ``save_as``: the optimized form is written there."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Threads that wait for work sleep instead of spinning: the cores are shared with decoding
    # and encoding (and, for a one-shot command, with a daemon); measured faster on a busy
    # 2-core machine, 0.82–0.92 s for a first image against 1.0 s.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_DISABLE_ALL if optimized else level.ORT_ENABLE_ALL
    if save_as is not None:
        options.optimized_model_filepath = str(save_as)
        # Not its warning that the file suits this machine only: optimized.py keys it so.
        options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def preprocess(image: np.ndarray) -> np.ndarray:
    """(1, 3, 320, 320) float32 model input from an RGB image (H, W, 3) uint8."""
    small = Image.fromarray(image).resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.LANCZOS)
    x = np.asarray(small, np.float32)
    # As rembg does: divide by the image's own maximum, not by 255.
    x /= max(float(x.max()), 1.0)
    x -= IMAGENET_MEAN
    x /= IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def postprocess(saliency: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Alpha matte (H, W) uint8 of ``size`` from a (320, 320) float32 saliency map."""
    low, high = float(saliency.min()), float(saliency.max())
    normalised = (saliency - low) / max(high - low, 1e-6)
    height, width = size
    alpha: np.ndarray = cv2.resize(normalised, (width, height), interpolation=cv2.INTER_CUBIC)
    np.clip(alpha, 0, 1, out=alpha)
    alpha *= 255
    matte: np.ndarray = np.rint(alpha, out=alpha).astype(np.uint8)
    return matte
