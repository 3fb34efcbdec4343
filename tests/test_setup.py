"""scripts/setup and scripts/check-packages, run as a person runs them, on throwaway copies."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from .conftest import ROOT


def run(*command: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """The set-up files of the project and a .venv without pip: any install attempt fails."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("scripts/setup", "scripts/check-packages", "pyproject.toml"):
        shutil.copy2(ROOT / name, repo / name)
    venv.create(repo / ".venv", with_pip=False)
    return repo


def test_setup_installs_nothing_when_nothing_changed(checkout: Path) -> None:
    stamp = run(checkout / "scripts/setup", "--stamp", "test").stdout.strip()
    (checkout / ".venv/.hotfolder-setup-test").write_text(stamp + "\n")
    result = run(checkout / "scripts/setup", "test")
    assert result.returncode == 0, result.stderr  # it would have failed had it called pip
    assert result.stderr == ""


def test_setup_installs_again_after_a_change_and_remembers_no_failure(checkout: Path) -> None:
    stamp_file = checkout / ".venv/.hotfolder-setup-test"
    stamp_file.write_text(run(checkout / "scripts/setup", "--stamp", "test").stdout)
    with (checkout / "pyproject.toml").open("a") as f:
        f.write("# a new dependency\n")
    result = run(checkout / "scripts/setup", "test")
    assert result.returncode != 0
    assert "No module named pip" in result.stderr  # it did try to install
    assert not stamp_file.exists()  # so the next run tries again


def test_setup_stamp_depends_on_the_extras(checkout: Path) -> None:
    plain = run(checkout / "scripts/setup", "--stamp").stdout
    with_tests = run(checkout / "scripts/setup", "--stamp", "test").stdout
    assert len(plain.strip()) == 64
    assert plain != with_tests


def has_gpu() -> bool:
    return run("sh", "-c", "nvidia-smi -L").returncode == 0


@pytest.mark.skipif(has_gpu(), reason="this machine has an NVIDIA GPU: CUDA packages belong")
def test_the_installation_has_no_cuda_package() -> None:
    result = run(ROOT / "scripts/check-packages", sys.executable)
    assert result.returncode == 0, result.stderr
    assert "CPU build" in result.stdout


@pytest.mark.skipif(has_gpu(), reason="this machine has an NVIDIA GPU: CUDA packages belong")
def test_check_packages_names_a_cuda_package(tmp_path: Path) -> None:
    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    site = next(env.glob("lib/python*/site-packages"))
    dist = site / "nvidia_cublas_cu12-12.8.4.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: nvidia-cublas-cu12\nVersion: 12.8.4.1\n"
    )
    result = run(ROOT / "scripts/check-packages", env / "bin/python")
    assert result.returncode == 1
    assert "nvidia-cublas-cu12" in result.stderr


def test_setup_installs_pytorch_again_when_its_settings_change(checkout: Path) -> None:
    # A PyTorch already installed (here a stand-in) must not hide a new TORCH_SPEC: the
    # settings are part of the stamp, so set-up runs, and it must act on them.
    site = next((checkout / ".venv").glob("lib/python*/site-packages"))
    (site / "torch").mkdir()
    (site / "torch/__init__.py").write_text("__version__ = '2.13.0+cpu'\n")
    env = {**os.environ, "TORCH_SPEC": "torch==2.5.0", "TORCH_INDEX_URL": "http://127.0.0.1:9/"}
    result = subprocess.run(
        [checkout / "scripts/setup"], cwd=checkout, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode != 0  # no pip in this environment: every install fails
    assert "installing torch==2.5.0" in result.stderr  # it did try to install that PyTorch


def test_run_keeps_the_folder_it_was_called_from_for_a_command(
    checkout: Path, tmp_path: Path
) -> None:
    shutil.copy2(ROOT / "scripts/run", checkout / "scripts/run")
    stamp = run(checkout / "scripts/setup", "--stamp").stdout
    (checkout / ".venv/.hotfolder-setup").write_text(stamp)
    # Stands in for the installed command: says where it runs and what it was given.
    command = checkout / ".venv/bin/hotfolder"
    command.write_text('#!/bin/sh\necho "$PWD" "$@"\n')
    command.chmod(0o755)
    elsewhere = tmp_path / "photos"
    elsewhere.mkdir()
    matte = run(checkout / "scripts/run", "matte", "in.jpg", "out.png", cwd=elsewhere)
    assert matte.returncode == 0, matte.stderr
    assert matte.stdout == f"{elsewhere} matte in.jpg out.png\n"  # the person's relative paths
    daemon = run(checkout / "scripts/run", cwd=elsewhere)
    assert daemon.stdout == f"{checkout} run\n"  # the daemon on the clone's ./config.yaml
