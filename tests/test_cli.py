"""`hotfolder matte` and `hotfolder check` as a person runs them: real processes, real files."""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from . import corpus
from .conftest import ROOT, WEIGHTS
from .daemon import Site, photo_jpegs, run_once


def hotfolder(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hotfolder", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def inbox(tmp_path: Path, photos: dict[str, np.ndarray]) -> Path:
    folder = tmp_path / "in"
    corpus.write(folder, "astronaut.jpg", corpus.jpeg(photos["astronaut"]))
    corpus.write(folder, "shoes/coffee.png", corpus.png(photos["coffee"]))
    corpus.write(folder, "shoes/notes.jpg", b"this is a shopping list, not a photo\n")
    corpus.write(folder, ".hidden.jpg", corpus.jpeg(photos["chelsea"]))
    return folder


def test_matte_writes_every_kind_and_reports_the_bad_file(inbox: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    kinds = ["--kind", "cutout", "--kind", "mask", "--kind", "composite"]
    result = hotfolder("matte", str(inbox), "-o", str(out), *kinds, "--background", "#00ff00")
    assert result.returncode == 1, result.stderr
    assert "notes.jpg: is not a JPEG, PNG, WebP, BMP, TIFF, HEIC/HEIF or AVIF" in result.stderr
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert written == [
        "astronaut.jpg", "astronaut.mask.png", "astronaut.png",
        "shoes", "shoes/coffee.jpg", "shoes/coffee.mask.png", "shoes/coffee.png",
    ]  # fmt: skip
    cutout_mode, cutout = corpus.load(out / "shoes/coffee.png")
    mask_mode, mask = corpus.load(out / "shoes/coffee.mask.png")
    _, composite = corpus.load(out / "shoes/coffee.jpg")
    assert (cutout_mode, mask_mode) == ("RGBA", "L")
    assert cutout.shape == (400, 600, 4)
    assert np.array_equal(cutout[:, :, 3], mask)
    original = corpus.load(inbox / "shoes/coffee.png")[1]
    visible, opaque = mask > 0, mask == 255
    # Opaque pixels are the photo's; the soft edge's carry the subject's estimated colour.
    assert np.array_equal(cutout[opaque, :3], original[opaque])
    assert not cutout[~visible].any()  # invisible pixels are cleared: smaller, faster PNGs
    background = mask == 0
    assert background.any()
    assert np.abs(composite[background].astype(int) - [0, 255, 0]).mean() < 8


def test_matte_exit_zero_when_every_file_works(inbox: Path, tmp_path: Path) -> None:
    (inbox / "shoes/notes.jpg").unlink()
    result = hotfolder("matte", str(inbox / "astronaut.jpg"), "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out/astronaut.png").is_file()
    assert "1 written" in result.stderr


def test_matte_never_overwrites_an_input_or_another_output(
    tmp_path: Path, photos: dict[str, np.ndarray]
) -> None:
    folder = tmp_path / "photos"
    corpus.write(folder, "cat.jpg", corpus.jpeg(photos["chelsea"]))
    corpus.write(folder, "cat.png", corpus.png(photos["chelsea"]))
    original = (folder / "cat.png").read_bytes()
    result = hotfolder("matte", str(folder), "-o", str(folder))
    assert result.returncode == 0, result.stderr
    assert (folder / "cat.png").read_bytes() == original
    # Each input gets a numbered output of its own instead of replacing an input or the other.
    assert sorted(p.name for p in folder.iterdir()) == ["cat-2.png", "cat-3.png", "cat.jpg",
                                                        "cat.png"]  # fmt: skip
    for name in ("cat-2.png", "cat-3.png"):
        mode, pixels = corpus.load(folder / name)
        assert mode == "RGBA"
        assert pixels.shape[:2] == photos["chelsea"].shape[:2]


def test_matte_reports_missing_inputs(tmp_path: Path) -> None:
    result = hotfolder("matte", str(tmp_path / "nothing.jpg"), "-o", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "nothing.jpg: no such file" in result.stderr


def test_check_accepts_the_default_config() -> None:
    result = hotfolder("check")
    assert result.returncode == 0, result.stderr
    assert "config: ok" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_check_refuses_cuda_without_a_gpu(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {{weights: {WEIGHTS}, device: cuda}}\n")
    result = hotfolder("check", "--config", str(config))
    assert result.returncode == 2
    assert "model.device is 'cuda' but no CUDA GPU is available" in result.stderr


def test_check_names_a_folder_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model: {{weights: {WEIGHTS}}}\n"
        "inboxes:\n"
        f"  - {{name: a, path: {tmp_path}/in, outbox: {blocker}/out, done: {tmp_path}/d,"
        f" errors: {tmp_path}/e}}\n"
    )
    result = hotfolder("check", "--config", str(config))
    assert result.returncode == 2
    assert "inboxes[0].outbox: cannot create" in result.stderr


def test_config_from_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("model: {nmae: u2netp}\n")
    result = subprocess.run(
        [sys.executable, "-m", "hotfolder", "check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"HOTFOLDER_CONFIG": str(config), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert result.returncode == 2
    assert "model.nmae: unknown key" in result.stderr


def test_matte_takes_any_name_and_skips_what_is_not_an_image(
    tmp_path: Path, photos: dict[str, np.ndarray]
) -> None:
    folder = tmp_path / "photos"
    latin1 = os.fsdecode(b"caf\xe9.jpg")  # as an old Windows or Samba client names it
    corpus.write(folder, latin1, corpus.jpeg(photos["chelsea"]))
    corpus.write(folder, "字" * 83 + ".jpg", corpus.jpeg(photos["coffee"]))  # 253 bytes
    corpus.write(folder, "README", b"photos from the spring shoot\n")
    out = tmp_path / "out"
    result = hotfolder("matte", str(folder), "-o", str(out), "--kind", "cutout", "--kind", "mask")
    assert result.returncode == 0, result.stderr
    written = sorted(os.fsencode(p.name) for p in out.iterdir())
    assert written[:2] == [b"caf\xe9.mask.png", b"caf\xe9.png"]
    assert len(written) == 4
    assert all(len(name) <= 255 for name in written)  # the long mask name is shortened
    assert "README: skipped" in result.stderr
    assert "2 written" in result.stderr


def test_matte_from_another_folder_finds_the_shipped_model(tmp_path: Path) -> None:
    # No config anywhere: the weights come from the installation, not the working folder.
    shutil.copy(ROOT / "samples/chelsea.jpg", tmp_path / "in.jpg")
    result = hotfolder("matte", "in.jpg", "out.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jpg", "out.png"]  # no ./matted
    mode, pixels = corpus.load(tmp_path / "out.png")
    assert (mode, pixels.shape) == ("RGBA", (300, 451, 4))


def test_matte_to_a_jpeg_file_writes_the_composite(tmp_path: Path) -> None:
    out = tmp_path / "flat.jpg"
    result = hotfolder("matte", str(ROOT / "samples/coffee.jpg"), str(out), "--background", "rdd")
    assert result.returncode == 2  # no colour it knows: said before the model loads
    assert "loaded" not in result.stderr
    result = hotfolder("matte", str(ROOT / "samples/coffee.jpg"), str(out), "--background", "black")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:3] == b"\xff\xd8\xff"
    assert not (ROOT / "matted").exists()


def test_matte_refuses_an_output_folder_that_is_a_file_before_the_model_loads(
    tmp_path: Path,
) -> None:
    notes = tmp_path / "README.md"
    notes.write_text("# notes\n")
    result = hotfolder("matte", str(ROOT / "samples/coffee.jpg"), "-o", str(notes))
    assert result.returncode == 2
    assert f"{notes}: -o names a file; give a folder for the outputs" in result.stderr
    assert "loaded" not in result.stderr
    assert notes.read_text() == "# notes\n"
    below = notes / "cutouts" / "today"
    result = hotfolder("matte", str(ROOT / "samples/coffee.jpg"), "-o", str(below))
    assert result.returncode == 2
    assert f"{below}: -o lies under the file {notes}; give a folder" in result.stderr
    assert "loaded" not in result.stderr


def test_check_says_an_inbox_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "inbox"
    blocker.write_text("")
    config = tmp_path / "config.yaml"
    config.write_text(
        "inboxes:\n"
        f"  - {{name: a, path: {blocker}, outbox: {tmp_path}/o, done: {tmp_path}/d,"
        f" errors: {tmp_path}/e}}\n"
    )
    result = hotfolder("check", "--config", str(config))
    assert result.returncode == 2
    assert f"inboxes[0].path: {blocker} is a file, not a folder" in result.stderr
    assert "File exists" not in result.stderr


def test_matte_shows_progress_in_the_log_and_quiet_silences_it(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    shutil.copytree(ROOT / "samples", folder)
    result = hotfolder("matte", str(folder), "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "skipped: " in result.stderr  # the samples' README, with a note
    assert "matte: 4/4 files" in result.stderr  # three photos and the README
    quiet = hotfolder("matte", "-q", str(folder), "-o", str(tmp_path / "out2"))
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""


def test_run_once_shows_progress(site: Site, photos: dict[str, np.ndarray]) -> None:
    site.write_config()
    for i, data in enumerate(photo_jpegs(photos, 5)):
        corpus.write(site.inbox, f"p{i}.jpg", data)
    log = site.root / "log"
    assert run_once(site.config, log) == 0
    assert "run --once: 5/5 files" in log.read_text()


def test_matte_refuses_an_output_file_and_an_output_folder_together(tmp_path: Path) -> None:
    out, folder = tmp_path / "cut.png", tmp_path / "cutouts"
    result = hotfolder("matte", str(ROOT / "samples/chelsea.jpg"), str(out), "-o", str(folder))
    assert result.returncode == 2
    assert f"{out}: an output file and -o {folder} together" in result.stderr
    assert "loaded" not in result.stderr
    assert not out.exists()
    assert not folder.exists()


def test_matte_rerun_onto_an_existing_output_says_where_the_outputs_go(tmp_path: Path) -> None:
    shutil.copy(ROOT / "samples/chelsea.jpg", tmp_path / "in.jpg")
    assert hotfolder("matte", "-q", "in.jpg", "out.png", cwd=tmp_path).returncode == 0
    # out.png now exists: it could be a photo, so it is an input, and that is said.
    result = hotfolder("matte", "in.jpg", "out.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    note = "out.png exists, so it is matted as an input too; the outputs go to matted"
    assert note in result.stderr
    assert result.stderr.index(note) < result.stderr.index("loaded")
    assert sorted(p.name for p in (tmp_path / "matted").iterdir()) == ["in.png", "out.png"]


def test_an_unknown_model_name_in_the_config_is_said_as_such(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("model: {name: u2netq}\n")
    result = hotfolder("check", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "model.name: 'u2netq' is not one of u2netp, u2net" in result.stderr
    assert "weights fetch u2netq" not in result.stderr  # no command that cannot work


def test_json_logs_on_a_terminal_stay_one_json_object_per_line(tmp_path: Path) -> None:
    # A container run with a terminal (docker run -t) and a log shipper reading its output:
    # progress comes as JSON log lines, never as a bar between them.
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "hotfolder", "matte", "--log-format", "json",
         str(ROOT / "samples/chelsea.jpg"), str(tmp_path / "cut.png")],
        stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, cwd=ROOT,
    )  # fmt: skip
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal is closed once the process has exited
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert process.wait(timeout=300) == 0, output
    lines = [line for line in output.decode().splitlines() if line.strip()]
    messages = [json.loads(line)["message"] for line in lines]
    assert any(m.startswith("matte: 1/1 files") for m in messages)


def test_matte_takes_a_file_named_twice_once(tmp_path: Path) -> None:
    photo, out = ROOT / "samples/chelsea.jpg", tmp_path / "out"
    result = hotfolder("matte", str(photo), str(ROOT / "samples"), str(photo), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "3 written" in result.stderr  # the three photos, chelsea.jpg once
    assert sorted(p.name for p in out.iterdir()) == ["astronaut.png", "chelsea.png", "coffee.png"]


@pytest.mark.parametrize("second", ["cut.webp", "cutouts"])
def test_matte_in_then_a_missing_name_it_cannot_write_is_refused(
    tmp_path: Path, second: str
) -> None:
    # Not an input (it does not exist) and not an output file matte writes: nothing is
    # matted into ./matted behind the person's back.
    shutil.copy(ROOT / "samples/chelsea.jpg", tmp_path / "in.jpg")
    result = hotfolder("matte", "in.jpg", second, cwd=tmp_path)
    assert result.returncode == 2
    refusal = f"{second}: no such file; an output file is named .png, .jpg or .jpeg"
    assert refusal in result.stderr
    assert "loaded" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jpg"]


MATTE_AND_SAY_IF_TORCH_LOADED = """
import sys
from hotfolder import cli
code = cli.main(sys.argv[1:])
print("torch" in sys.modules, code)
"""


def test_matte_on_the_cpu_imports_no_pytorch_once_the_model_is_exported(tmp_path: Path) -> None:
    """PyTorch's import alone takes longer than a photo's matte: a one-shot command on the CPU
    pays it only the first time, to export the model for ONNX Runtime."""
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {{device: cpu, onnx_cache: {tmp_path / 'cache'}}}\n")
    photo = ROOT / "samples/chelsea.jpg"

    def matte(out: str) -> str:
        command = [sys.executable, "-c", MATTE_AND_SAY_IF_TORCH_LOADED, "matte", "-c", str(config)]
        return subprocess.run(
            [*command, str(photo), str(tmp_path / out)],
            cwd=tmp_path, capture_output=True, text=True, timeout=300, check=True,
        ).stdout.strip()  # fmt: skip

    assert matte("first.png") == "True 0"  # exported, with PyTorch
    assert matte("second.png") == "False 0"
    assert corpus.load(tmp_path / "second.png")[1].shape == (300, 451, 4)


def test_a_daemon_on_the_cpu_imports_no_pytorch_once_the_model_is_exported(
    site: Site, photos: dict[str, np.ndarray], onnx_cache: Path
) -> None:
    """A restarted daemon on the CPU is serving again without PyTorch's import (and its
    hundreds of MB of memory) once its model is exported."""
    from hotfolder import quantized

    quantized.onnx_model("u2netp", WEIGHTS, onnx_cache)  # fp32 and int8-mixed, for `auto`
    model = {"weights": str(WEIGHTS), "device": "cpu", "onnx_cache": str(onnx_cache)}
    site.write_config(model=model)
    corpus.write(site.inbox, "p.jpg", photo_jpegs(photos, 1)[0])
    command = [sys.executable, "-c", MATTE_AND_SAY_IF_TORCH_LOADED, "run", "--once", "-q"]
    result = subprocess.run(
        [*command, "-c", str(site.config)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert result.stdout.strip() == "False 0", result.stderr
    assert site.files(site.outbox) == ["p.mask.png", "p.png"]


SAY_AT_EXIT = """
import atexit
from hotfolder import cli
atexit.register(print, "torn down")
cli.command()
"""


def test_matte_ends_its_process_at_once_with_its_log_and_exit_status(tmp_path: Path) -> None:
    """Nothing is left to do when matte returns: the process ends without tearing down its
    modules (no atexit handler runs), and its log lines and exit status still come out."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", SAY_AT_EXIT, *args],
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    missing = run("matte", "missing.jpg", "-o", "out")
    assert missing.returncode == 1
    assert "missing.jpg: no such file" in missing.stderr
    assert "0 written to out, 0 skipped (not images), 1 failed" in missing.stderr
    assert "torn down" not in missing.stdout
    logged = run("matte", "--log-format", "json", "missing.jpg", "-o", "out")
    assert logged.returncode == 1
    assert json.loads(logged.stderr.splitlines()[-1])["message"].startswith("0 written")
    assert "torn down" not in logged.stdout
    other = run("history", "-c", "none.yaml")  # any other command ends as before
    assert other.returncode == 2
    assert "torn down" in other.stdout


@pytest.mark.parametrize("closed", [">&-", "2>&-"])
def test_matte_with_a_standard_stream_closed_writes_its_outputs_and_exits_zero(
    tmp_path: Path, closed: str
) -> None:
    """A job started with stdout or stderr closed (some schedulers do) still mattes and says
    success: a closed stream is neither flushed at the exit nor asked whether it is a terminal."""
    photo = ROOT / "samples" / "chelsea.jpg"
    line = f'exec {closed}; exec "$0" -m hotfolder matte -c none.yaml "$1" -o out'
    if closed == ">&-":  # stderr still open: keep it for the assertion's message
        line = line.replace("exec >&-", "exec >&- 2>log")
    else:
        line = line.replace("exec 2>&-", "exec 2>&- >log")
    config = tmp_path / "none.yaml"
    config.write_text(f"model:\n  weights: {WEIGHTS}\n  runtime: torch\n  precision: fp32\n")
    result = subprocess.run(
        ["bash", "-c", line, sys.executable, str(photo)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log_text = (tmp_path / "log").read_text(encoding="utf-8", errors="replace")
    assert result.returncode == 0, log_text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["chelsea.png"], log_text
