"""What this host's processors can do, read from the kernel without importing PyTorch (a
one-shot command on the CPU never loads it)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

# CPU flags of native bf16 arithmetic (dot products): AMX on Xeon since Sapphire Rapids,
# AVX-512 BF16 on Cooper Lake, Zen 4 and later. Without them PyTorch emulates bf16, slower than
# fp32.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# The widest vector instruction set a flag shows, widest first, as the kernel spells them.
VECTOR_ISAS = (("avx512f", "AVX512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2"))
# Where the NVIDIA driver shows itself: without it no CUDA GPU can be used.
NVIDIA_DRIVER = Path("/proc/driver/nvidia/gpus")


@functools.cache
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's feature flags, as the kernel lists them; empty where unreadable."""
    try:
        text = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def native_bf16() -> str | None:
    """The flag by which this CPU computes bf16 natively, or None."""
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in cpu_flags()), None)


def vector_isa() -> str:
    """The widest vector instruction set of this CPU (``AVX512``, ``AVX2``, …), or ``unknown``."""
    flags = cpu_flags()
    return next((name for flag, name in VECTOR_ISAS if flag in flags), "unknown")


def describe() -> str:
    """This CPU's vector instruction set, and whether it computes bf16 natively."""
    flag = native_bf16()
    bf16 = f"native bf16 ({flag})" if flag else "no native bf16"
    return f"CPU {vector_isa()}, {bf16}"


def physical_cores(cpuinfo: Path = Path("/proc/cpuinfo")) -> int:
    """Cores this process may use, a pair of hyper-threads counted once (as PyTorch and ONNX
    Runtime count them by default); ``OMP_NUM_THREADS`` when set, as both honour it."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    allowed = os.sched_getaffinity(0)
    try:
        text = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return len(allowed)
    cores = set()
    for block in text.split("\n\n"):
        fields = _fields(block)
        processor = fields.get("processor", "")
        if processor.isdigit() and int(processor) in allowed:
            # Without a core id (many virtual machines list none) each processor is a core.
            cores.add((fields.get("physical id"), fields.get("core id", f"cpu{processor}")))
    return max(len(cores), 1)


def _fields(block: str) -> dict[str, str]:
    """One processor's ``key : value`` lines."""
    pairs = (line.partition(":") for line in block.splitlines())
    return {key.strip(): value.strip() for key, _, value in pairs}


def nvidia_gpu_present(driver: Path = NVIDIA_DRIVER) -> bool:
    """Whether the NVIDIA driver lists a GPU that CUDA lets this process see: where it does
    not, ``device: auto`` is the CPU without asking PyTorch (importing it takes over a
    second)."""
    # CUDA_VISIBLE_DEVICES empty, or starting with an invalid index such as -1, hides every GPU
    # (the usual way to keep a process on the CPU of a GPU server).
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and (not visible.strip() or visible.strip().startswith("-")):
        return False
    try:
        return any(driver.iterdir())
    except OSError:
        return False
