"""What the host's processors can do, read from the kernel's files."""

from __future__ import annotations

from pathlib import Path

import pytest

from hotfolder import cpuinfo

# Two hyper-threads on each of two cores, as /proc/cpuinfo lists them.
HYPERTHREADED = "".join(
    f"processor\t: {n}\nphysical id\t: 0\ncore id\t\t: {n % 2}\nflags\t\t: fpu avx2\n\n"
    for n in range(4)
)


def test_cpu_flags_come_from_the_first_cpu(tmp_path: Path) -> None:
    listing = tmp_path / "cpuinfo"
    listing.write_text(
        "processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16 amx_tile\n\n"
        "processor\t: 1\nflags\t\t: fpu\n"
    )
    assert cpuinfo.cpu_flags(listing) == {"fpu", "avx2", "avx512_bf16", "amx_tile"}
    assert cpuinfo.cpu_flags(tmp_path / "absent") == frozenset()


def test_hyperthreads_of_one_core_count_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listing = tmp_path / "cpuinfo"
    listing.write_text(HYPERTHREADED)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert cpuinfo.physical_cores(listing) == 2
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})  # taskset to one thread
    assert cpuinfo.physical_cores(listing) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpuinfo.physical_cores(listing) == 3


def test_cores_without_topology_count_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Virtual machines often list no core ids: each processor is a core."""
    listing = tmp_path / "cpuinfo"
    listing.write_text("".join(f"processor\t: {n}\nflags\t\t: fpu\n\n" for n in range(3)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})
    assert cpuinfo.physical_cores(listing) == 3


def test_a_gpu_is_present_only_where_the_driver_lists_one(tmp_path: Path) -> None:
    assert not cpuinfo.nvidia_gpu_present(tmp_path / "absent")
    gpus = tmp_path / "gpus"
    gpus.mkdir()
    assert not cpuinfo.nvidia_gpu_present(gpus)
    (gpus / "0000:17:00.0").mkdir()
    assert cpuinfo.nvidia_gpu_present(gpus)


@pytest.mark.parametrize("visible", ["", "-1", "-1,0"])
def test_gpus_hidden_from_cuda_are_not_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, visible: str
) -> None:
    """A CPU daemon on a GPU server, its GPUs hidden from it as CUDA lets one hide them, runs
    on the CPU: ``device: auto`` must not count them."""
    (tmp_path / "0000:17:00.0").mkdir()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert not cpuinfo.nvidia_gpu_present(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert cpuinfo.nvidia_gpu_present(tmp_path)


def test_the_vector_instruction_set_is_the_one_pytorch_uses() -> None:
    import torch

    used = torch.backends.cpu.get_cpu_capability()
    if used not in ("AVX2", "AVX512"):
        pytest.skip(f"PyTorch uses {used} here")
    assert cpuinfo.vector_isa() == used
