"""The model as an ONNX graph for ONNX Runtime: exported from its safetensors weights once,
checked against PyTorch, and kept in a cache folder, so that later starts load it without
importing PyTorch.

A cached graph is named by its architecture, the sha256 of the weights and :data:`FORMAT`: new
weights (or a changed export) get a graph of their own, never a stale one. The graph also
carries both in its metadata, so that a file under that name which is not that export (another
program's model, the export of other weights copied over it) is told apart and never run.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hotfolder.publish import write_atomic

log = logging.getLogger(__name__)

# Raised whenever the exported graph changes, so caches made by older versions are not used
# (3: kept graphs carry a checksum; older ones, unsealed, are made again and swept away).
FORMAT = 3
# ONNX opset of the export: supported by every ONNX Runtime since 1.12.
OPSET = 17
# The largest |Δ| of saliency (0–1) allowed between the graph on ONNX Runtime and the model on
# PyTorch, on a random input: the two differ only by float rounding (3e-6 measured for u2netp);
# a graph that misses it is refused.
TOLERANCE = 1e-4
CHECK_SIZE = 320  # models.INPUT_SIZE; the graph takes any batch size
INPUT, OUTPUT = "input", "saliency"
# Metadata of the export (ModelProto.metadata_props): what it is the graph of.
ARCH_KEY, WEIGHTS_KEY = "hotfolder.arch", "hotfolder.weights_sha256"
# The form of a graph made from the export (quantized.py's); the export itself has none: fp32.
PRECISION_KEY, FP32 = "hotfolder.precision", "fp32"
METADATA_FIELD = 14  # ModelProto.metadata_props; StringStringEntryProto: key 1, value 2
# A kept graph ends in one more metadata entry, the CRC-32 of everything before it: damage that
# leaves a valid protobuf (a flipped bit, an overwritten block inside a weight tensor) would
# otherwise load without a word and draw NaN mattes.
SEAL_KEY = "hotfolder.crc32"


class ExportError(Exception):
    """The model could not be exported, or its graph does not compute what PyTorch does."""


def weights_digest(weights: Path) -> str:
    """sha256 of the weights file, hex. Raises OSError when it cannot be read."""
    digest = hashlib.sha256()
    with weights.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cache_path(arch: str, weights: Path, cache: Path, digest: str | None = None) -> Path:
    """Where the graph of ``arch`` with ``weights`` (whose sha256 is ``digest``, computed when
    not given) is kept in ``cache``."""
    return cache / f"{arch}-{(digest or weights_digest(weights))[:24]}-v{FORMAT}.onnx"


def onnx_model(
    arch: str, weights: Path, cache: Path, refresh: bool = False, digest: str | None = None
) -> bytes:
    """The serialized ONNX graph of ``arch`` with ``weights`` (sha256 ``digest``, computed when
    not given): from ``cache`` when it is there (unless ``refresh``), else exported (importing
    PyTorch: seconds) and kept there. A cache that cannot be written costs only the export at
    each start, with a warning. Raises ExportError, OSError for unreadable weights."""
    digest = digest or weights_digest(weights)

    def make() -> bytes:
        log.info("exporting model %s for ONNX Runtime (once per weights file)", arch)
        return export(arch, weights, digest)

    return kept(cache_path(arch, weights, cache, digest), "exported model", make, refresh)


def kept(path: Path, what: str, make: Callable[[], bytes], refresh: bool = False) -> bytes:
    """The graph kept in the cache as ``path`` (``what`` it is, for the log), unless
    ``refresh``; else the one ``make`` returns, kept there for later starts. A cache that cannot
    be read or written costs only making the graph again, with a warning."""
    if not refresh:
        data = read_kept(path, what)
        if data is not None:
            return data
    data = make()
    try:
        write_atomic(path, sealed(data), mode=0o644)
    except OSError as exc:
        log.warning("cannot keep the %s as %s (%s); it is made again at each start",
                    what, path, exc)  # fmt: skip
    return data


def read_kept(path: Path, what: str) -> bytes | None:
    """The graph kept in the cache as ``path`` (``what`` it is, for the log), without its seal;
    None when there is none, or it cannot be read or is damaged (with a warning): it is then
    made again."""
    try:
        return unsealed(read_file(path))
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read the %s %s (%s); making it again", what, path, exc)
        return None


def read_file(path: Path) -> bytes:
    """The content of the regular file ``path``. Raises FileNotFoundError, and OSError for the
    rest, such as a FIFO or a device under that name (reading one could block a start
    forever, without a word)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    # Checked on the descriptor: open() would refuse a folder naming the descriptor, not it.
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise OSError("not a regular file")
    with open(descriptor, "rb") as f:
        return f.read()


def sealed(graph: bytes) -> bytes:
    """The serialized ONNX graph ``graph`` with its CRC-32 appended as a metadata entry, as it
    is kept in the cache (see :func:`unsealed`)."""
    return graph + _seal(graph)


def unsealed(data: bytes) -> bytes:
    """The graph kept as ``data`` by :func:`sealed`, without its seal. Raises OSError when
    the content is not what was kept (damaged). A graph without a seal (kept by an earlier
    version, or put there by hand) is returned as it is: loading it, ONNX Runtime and
    :func:`mismatch` judge it."""
    blank = _seal(b"")  # every seal has this length, and all but its 8 hex digits in common
    graph, seal = data[: -len(blank)], data[-len(blank) :]
    if len(data) < len(blank) or seal[:-8] != blank[:-8]:
        return data
    if seal != _seal(graph):
        raise OSError("damaged: its content does not match the checksum it was kept with")
    return graph


def _seal(graph: bytes) -> bytes:
    return with_metadata(b"", {SEAL_KEY: f"{zlib.crc32(graph):08x}"})


def mismatch(session: Any, arch: str, digest: str, precision: str = FP32) -> str | None:
    """Why the graph loaded in the ONNX Runtime ``session`` is not the export of ``arch`` with
    the weights of sha256 ``digest`` in the form ``precision`` (fp32, or one made from it such
    as int8-mixed), or None when it is."""
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [INPUT] or OUTPUT not in outputs:
        return f"its inputs are {inputs} and outputs {outputs}, not [{INPUT!r}] and {OUTPUT!r}"
    metadata = session.get_modelmeta().custom_metadata_map
    made_of = (metadata.get(ARCH_KEY), metadata.get(WEIGHTS_KEY))
    if made_of != (arch, digest):
        return f"it is the export of {made_of[0]} with weights of sha256 {made_of[1]}"
    # Both forms name the same model and weights: the fp32 graph copied under the int8-mixed
    # name would otherwise run while the log and ``hotfolder check`` say int8-mixed.
    form = metadata.get(PRECISION_KEY, FP32)
    if form != precision:
        return f"it is the {form} form, not {precision}"
    return None


def export(arch: str, weights: Path, digest: str) -> bytes:
    """``arch`` with ``weights`` (of sha256 ``digest``) as an ONNX graph (input ``input``
    (N, 3, 320, 320) float32, output ``saliency`` (N, 1, 320, 320) float32) that names both in
    its metadata, after checking that ONNX Runtime computes what PyTorch does within
    :data:`TOLERANCE`."""
    import torch

    from hotfolder import models

    try:
        model = models.load(arch, weights)
    except models.WeightsError as exc:
        raise ExportError(str(exc)) from exc
    example = torch.rand(1, 3, CHECK_SIZE, CHECK_SIZE, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter, and functions it uses, are deprecated in favour of
        # torch.export's exporter, which needs onnxscript; this one still exports U²-Net
        # exactly (checked below).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (example,), buffer,  # type: ignore[arg-type]  # file objects work too
            input_names=[INPUT], output_names=[OUTPUT],
            opset_version=OPSET, dynamic_axes={"input": {0: "batch"}, "saliency": {0: "batch"}},
            dynamo=False,
        )  # fmt: skip
    data = with_metadata(buffer.getvalue(), {ARCH_KEY: arch, WEIGHTS_KEY: digest})
    with torch.inference_mode():
        expected = model(example).numpy()
    check(data, example.numpy(), expected)
    return data


def check(data: bytes, example: np.ndarray, expected: np.ndarray) -> None:
    """Raise ExportError unless the graph ``data`` gives ``expected`` for ``example``."""
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT], {INPUT: example})
    worst = float(np.abs(got - expected).max()) if got.shape == expected.shape else np.inf
    if not worst <= TOLERANCE:
        raise ExportError(f"the exported model differs from PyTorch's by {worst:.2g}")


def with_metadata(graph: bytes, metadata: dict[str, str]) -> bytes:
    """The serialized ONNX ModelProto ``graph`` with ``metadata`` added to its metadata_props.
    Protobuf merges fields appended to a message into it, so this needs no ONNX package."""
    entries = b"".join(
        _field(METADATA_FIELD, _field(1, key.encode()) + _field(2, value.encode()))
        for key, value in metadata.items()
    )
    return graph + entries


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
