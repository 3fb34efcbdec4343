"""ONNX Runtime's own optimized form of a cached graph, kept beside it so that later starts skip
graph optimization.

Optimizing the int8-mixed u2netp graph at ``ORT_ENABLE_ALL`` is most of the 0.06–0.10 s an
InferenceSession takes to create on the 2-core development machine, and ONNX Runtime holds the
GIL throughout, so a one-shot ``hotfolder matte`` decodes nothing meanwhile; the kept form
loads in 0.04 s with optimization off, and computes exactly the same mattes (the same nodes
run).

The form is made once, by the session that optimizes the cached graph anyway
(``SessionOptions.optimized_model_filepath``). At that level ONNX Runtime rewrites
convolutions into a blocked memory layout sized for the CPU's vector width and fuses by what
the CPU can do: the file is only valid for this ONNX Runtime and this kind of CPU, so its name
carries the ONNX Runtime version and a digest of the CPU's feature flags, and another machine
sharing the cache (or this one after an upgrade) makes one of its own. Like the graph it is
made from, it names model, weights and form in its metadata and is checked on every load
(``exported.mismatch``); one that cannot be loaded, or is not this model's, is made again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hotfolder import cpuinfo, exported
from hotfolder.publish import write_atomic

log = logging.getLogger(__name__)


def host_key() -> str:
    """This CPU and ONNX Runtime, for a file name: ``ort<version>-<isa>-<12 hex digits>``, the
    digits those of the sha256 of the CPU's feature flags (sorted, space-separated)."""
    import onnxruntime as ort

    flags = " ".join(sorted(cpuinfo.cpu_flags()))
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return f"ort{ort.__version__}-{cpuinfo.vector_isa().lower()}-{digest}"


def cache_path(graph: Path) -> Path:
    """Where the optimized form of the cached graph ``graph`` is kept, for this host."""
    return graph.with_name(f"{graph.stem}-opt-{host_key()}.onnx")


@contextlib.contextmanager
def scratch() -> Iterator[Path | None]:
    """A path in a temporary folder of its own for ONNX Runtime to write an optimized form to
    (it writes no file atomically), removed afterwards; None where no such folder can be
    made: the start then goes on without keeping one."""
    try:
        folder = tempfile.TemporaryDirectory(prefix="hotfolder-ort-")
    except OSError as exc:
        log.info("cannot make a folder for the optimized model (%s)", exc)
        yield None
        return
    with folder:
        yield Path(folder.name) / "optimized.onnx"


def keep_written(path: Path, written: Path) -> None:
    """Keep the optimized form ONNX Runtime wrote as ``written`` as ``path``. A cache that
    cannot be written costs only the optimization at each start."""
    try:
        write_atomic(path, exported.sealed(exported.read_file(written)), mode=0o644)
    except OSError as exc:
        log.info("cannot keep the optimized model as %s (%s)", path, exc)
