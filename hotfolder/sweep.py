"""Keeping the model cache from growing: files that no start can use again are removed.

The cache (``model.onnx_cache``) holds, per weights file, the exported graph, its int8-mixed
form, and ONNX Runtime's optimized form of the one in use (per ONNX Runtime version and CPU).
Names carry format numbers (:data:`hotfolder.exported.FORMAT`,
:data:`hotfolder.quantized.FORMAT`) that change when an upgrade of hotfolder makes older files
unusable, and an upgrade of ONNX Runtime does the same to optimized forms: without a sweep each
upgrade leaves a model's worth of dead files (4.6 MB for u2netp, 176 MB for u2net) behind.

Only files of the weights being started are touched: another weights file's graphs may belong
to another configuration on the same host. Files of a newer format (a newer hotfolder sharing
the folder), optimized forms of a newer ONNX Runtime (another installation sharing it) or of a
version that cannot be compared, and temp files younger than :data:`TEMP_AGE_S` (a build may
be writing them now) are kept: removing what another start uses would have it made again at
each of its starts, and have this sweep remove it again.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

log = logging.getLogger(__name__)

# A build writes its temp file and renames it within seconds; one an hour old was left by a
# process that died mid-write.
TEMP_AGE_S = 3600.0

_GRAPH = re.compile(
    r"(?P<base>.+-[0-9a-f]{24})-v(?P<v>\d+)(?:-int8-mixed-q(?P<q>\d+))?"
    r"(?:-opt-ort(?P<ort>[^-]+)-(?P<cpu>.+))?\.onnx",
    re.ASCII,
)
_TEMP = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{8}\.tmp", re.ASCII)
_RELEASE = re.compile(r"\d+(?:\.\d+)*", re.ASCII)


def sweep(kept: Path, host: str, formats: tuple[int, int]) -> None:
    """Remove from ``kept``'s folder the files of the same model and weights that no start can
    use again: those of formats older than ``formats`` (export, int8-mixed), optimized forms made
    on this CPU (``host``: ``ort<version>-<cpu>`` as :func:`hotfolder.optimized.host_key`
    gives) by an older ONNX Runtime, and stale temp files. ``kept`` is a graph of the cache
    (any of its forms). Failures are logged, never raised: a sweep is housekeeping."""
    own = _GRAPH.fullmatch(kept.name)
    if own is None:
        return
    version, cpu = host.removeprefix("ort").split("-", 1)
    removed, freed = 0, 0
    try:
        entries = list(os.scandir(kept.parent))
    except OSError as exc:
        log.info("cannot list the model cache %s (%s)", kept.parent, exc)
        return
    for entry in entries:
        try:
            if not _unusable(entry, own["base"], formats, version, cpu):
                continue
            size = entry.stat(follow_symlinks=False).st_size
            os.unlink(entry.path)
        except OSError as exc:  # gone meanwhile (another start swept it), or not ours to remove
            log.info("cannot remove %s from the model cache (%s)", entry.path, exc)
            continue
        removed, freed = removed + 1, freed + size
    if removed:
        log.info("removed %d files no start can use from the model cache %s (%.1f MB)",
                 removed, kept.parent, freed / 1e6)  # fmt: skip


def _unusable(
    entry: os.DirEntry[str], base: str, formats: tuple[int, int], version: str, cpu: str
) -> bool:
    if not entry.is_file(follow_symlinks=False):
        return False
    temp = _TEMP.fullmatch(entry.name)
    if temp is not None:
        if not temp["name"].startswith(base):
            return False
        try:
            age = time.time() - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            return False
        return age > TEMP_AGE_S
    graph = _GRAPH.fullmatch(entry.name)
    if graph is None or graph["base"] != base:
        return False
    export_format, int8_format = formats
    if int(graph["v"]) < export_format:
        return True
    int8 = graph["q"] is not None
    if int8 and int(graph["q"]) < int8_format:
        return True
    newer_format = int(graph["v"]) > export_format or (int8 and int(graph["q"]) > int8_format)
    if graph["cpu"] != cpu or newer_format:
        return False
    return _older(graph["ort"], version)


def _older(version: str, than: str) -> bool:
    """Whether the ONNX Runtime ``version`` is an older release than ``than`` (by their
    leading release numbers, such as 1.20.1); False where either has none."""
    theirs, ours = _release(version), _release(than)
    return theirs is not None and ours is not None and theirs < ours


def _release(version: str) -> tuple[int, ...] | None:
    numbers = _RELEASE.match(version)
    return None if numbers is None else tuple(int(n) for n in numbers[0].split("."))
