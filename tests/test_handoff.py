"""``hotfolder matte`` through a running daemon's model, over its local socket."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from hotfolder import handoff
from hotfolder.config import load as load_config
from hotfolder.turns import Turns

from . import corpus
from .conftest import ROOT, WEIGHTS
from .daemon import Site, kill, start, stop, wait_for, wait_serving

USING_DAEMON = "using the model of the daemon"


# hotfolder matte, then which of the model's runtimes it imported
MATTE_AND_SAY_RUNTIMES = """
import sys
from hotfolder import cli
code = cli.main(sys.argv[1:])
print(" ".join(sorted({"onnxruntime", "torch"} & set(sys.modules))))
sys.exit(code)
"""


def matte(
    config: Path, *inputs: Path, outdir: Path, program: tuple[str, ...] = ("-m", "hotfolder")
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, *program, "matte", "-c", str(config), "--kind", "mask"]
    return subprocess.run(
        [*command, *map(str, inputs), "-o", str(outdir)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def socket_of(site: Site) -> Path:
    return handoff.socket_path(site.journal.parent)


def serving_socket(site: Site) -> bool:
    return socket_of(site).exists() and b"serving the model" in (site.root / "log").read_bytes()


def start_serving(site: Site, config: Path) -> subprocess.Popen[bytes]:
    """A daemon on ``config``, logging to the site's ``log``, once its local socket serves
    (stopped again if it never does)."""
    log = site.root / "log"
    daemon = start(config, log=log)
    try:
        wait_serving(log)
        wait_for(lambda: serving_socket(site), 60, "the local socket")
    except BaseException:
        stop(daemon)
        raise
    return daemon


def photo_files(folder: Path, photos: dict[str, np.ndarray]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, pixels in list(photos.items())[:2]:
        path = folder / f"{name}.jpg"
        path.write_bytes(corpus.jpeg(pixels))
        paths.append(path)
    return paths


def masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.iterdir())}


def test_matte_uses_the_daemons_model_and_its_own_once_the_daemon_is_gone(
    site: Site, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    config = site.write_config()
    inputs = photo_files(tmp_path / "photos", photos)
    daemon = start_serving(site, config)
    try:
        mode = os.lstat(socket_of(site)).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o755  # as the daemon's folders
        through = matte(config, *inputs, outdir=tmp_path / "through",
                        program=("-c", MATTE_AND_SAY_RUNTIMES))  # fmt: skip
    finally:
        assert stop(daemon) == 0
    assert through.returncode == 0, through.stderr
    assert USING_DAEMON in through.stderr
    assert through.stdout.strip() == ""  # nor loaded a model's runtime: the daemon answered
    assert not socket_of(site).exists()  # removed on exit
    alone = matte(config, *inputs, outdir=tmp_path / "alone")
    assert alone.returncode == 0, alone.stderr
    assert USING_DAEMON not in alone.stderr
    ours, theirs = masks(tmp_path / "alone"), masks(tmp_path / "through")
    assert ours.keys() == theirs.keys() == {"astronaut.mask.png", "chelsea.mask.png"}
    for name, mask in ours.items():  # the same model; only thread counts differ
        difference = np.abs(mask.astype(np.int16) - theirs[name])
        assert difference.max() <= 2, name


def test_matte_asking_for_other_mattes_than_the_daemons_uses_its_own_model(
    site: Site, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    config = site.write_config(model={"weights": str(WEIGHTS), "device": "cpu"})
    inputs = photo_files(tmp_path / "photos", photos)[:1]
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(WEIGHTS.read_bytes())
    asks = {  # each changes the mattes: the same model name is not the same model
        "precision": {"precision": "bf16-mixed"},
        "flip": {"flip_average": True},
        "runtime": {"runtime": "torch"},  # the daemon's auto is ONNX Runtime on this CPU
        "weights": {"weights": str(copy)},
    }
    daemon = start_serving(site, config)
    try:
        for name, change in asks.items():
            settings = yaml.safe_load(config.read_text())
            settings["model"].update(change)
            other = tmp_path / f"{name}.yaml"
            other.write_text(yaml.safe_dump(settings))
            result = matte(other, *inputs, outdir=tmp_path / name)
            assert result.returncode == 0, result.stderr
            assert USING_DAEMON not in result.stderr, name
        same = matte(config, *inputs, outdir=tmp_path / "same")
        assert USING_DAEMON in same.stderr
    finally:
        assert stop(daemon) == 0


def send_raw(path: Path, data: bytes) -> bytes:
    """``data`` on a fresh connection, and what comes back until the daemon closes it (a
    close with bytes of ours still unread resets the connection: what came before counts)."""
    received = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
        peer.settimeout(120)
        peer.connect(str(path))
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            peer.sendall(data)
            peer.shutdown(socket.SHUT_WR)
            while chunk := peer.recv(65536):
                received += chunk
    return received


def test_bad_requests_never_stop_the_daemon_nor_its_inbox(
    site: Site, photos: dict[str, np.ndarray]
) -> None:
    config = site.write_config(limits={"max_pixels": 10_000})
    log = site.root / "log"
    daemon = start_serving(site, config)
    try:
        path = socket_of(site)
        first = struct.pack("!II", 80, 80) + bytes(80 * 80 * 3)
        bad = [
            b"GET / HTTP/1.1\r\n\r\n",
            handoff.REQUEST + struct.pack("!III", 1, 100_000, 100_000),  # over max_pixels
            handoff.REQUEST + struct.pack("!I", 0),
            handoff.REQUEST + struct.pack("!I", 1000),  # over max_batch_size
            handoff.REQUEST + struct.pack("!III", 1, 10, 10) + b"cut short",
            handoff.REQUEST + struct.pack("!I", 2) + first + first,  # 12 800 pixels in all
            b"",
        ]
        for request in bad:
            send_raw(path, request)
        wait_for(lambda: log.read_bytes().count(b"refused a request") == 6, 60, "refusals")
        client = handoff.connect(path, lambda hello: True)
        assert client is not None
        picture = np.asarray(Image.fromarray(next(iter(photos.values()))).resize((64, 48)))
        alphas = client.predict([picture] * 4)  # 12 288 pixels: the client sends two requests
        assert len(alphas) == 4
        for alpha in alphas:
            assert alpha.shape == (48, 64)
            assert alpha.dtype == np.uint8
            assert alpha.max() > 0
        client.close()
        assert b"not writable" not in log.read_bytes()  # PyTorch warns of read-only pictures
        (site.inbox / "after.jpg").write_bytes(corpus.jpeg(picture))
        wait_for(lambda: (site.outbox / "after.png").exists(), 120, "the inbox file's cutout")
        assert daemon.poll() is None
    finally:
        assert stop(daemon) == 0


def test_a_reloaded_config_sets_the_sockets_limits(site: Site) -> None:
    config = site.write_config(limits={"max_pixels": 4_000_000})
    log = site.root / "log"
    daemon = start_serving(site, config)
    try:
        site.write_config(limits={"max_pixels": 10_000}, batching={"max_batch_size": 2})
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: b"config reloaded" in log.read_bytes(), 60, "the reload")
        client = handoff.connect(socket_of(site), lambda hello: True)
        assert client is not None
        assert (client.hello["max_pixels"], client.hello["max_batch"]) == (10_000, 2)
        client.close()
        picture = struct.pack("!II", 80, 80) + bytes(80 * 80 * 3)
        reply = send_raw(socket_of(site), handoff.REQUEST + struct.pack("!I", 2) + picture * 2)
        assert reply.split(b"\n", 1)[1].startswith(handoff.ERR)  # 12 800 pixels in all
        reply = send_raw(socket_of(site), handoff.REQUEST + struct.pack("!I", 3))
        assert reply.split(b"\n", 1)[1].startswith(handoff.ERR)  # 3 pictures
    finally:
        assert stop(daemon) == 0


def test_a_socket_left_by_a_killed_daemon_is_taken_over(
    site: Site, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    config = site.write_config()
    log = site.root / "log"
    daemon = start(config, log=log)
    wait_serving(log)
    wait_for(lambda: serving_socket(site), 60, "the local socket")
    kill(daemon)
    assert stat.S_ISSOCK(os.lstat(socket_of(site)).st_mode)  # nobody removed it
    inputs = photo_files(tmp_path / "photos", photos)
    alone = matte(config, *inputs, outdir=tmp_path / "alone")
    assert alone.returncode == 0, alone.stderr
    assert USING_DAEMON not in alone.stderr
    log.write_bytes(b"")
    daemon = start(config, log=log)
    try:
        wait_for(lambda: serving_socket(site), 60, "the local socket, again")
        assert b"removing the stale socket" in log.read_bytes()
        through = matte(config, *inputs, outdir=tmp_path / "through")
        assert through.returncode == 0, through.stderr
        assert USING_DAEMON in through.stderr
    finally:
        assert stop(daemon) == 0


def test_callers_of_the_model_take_turns_in_arrival_order() -> None:
    turns = Turns()
    order: list[str] = []

    def caller(name: str) -> None:
        with turns:
            order.append(name)

    threads = []
    with turns:  # the daemon's batch in the model; two callers arrive, one after the other
        for name, waiting in (("first", 2), ("second", 3)):
            thread = threading.Thread(target=caller, args=(name,))
            thread.start()
            threads.append(thread)
            wait_for(lambda n=waiting: turns._next_ticket == n, 60, f"{name} to queue")  # type: ignore[misc]
        order.append("holder")
    for thread in threads:
        thread.join(60)
    assert order == ["holder", "first", "second"]


def test_matte_ignores_a_socket_planted_by_another_user(
    site: Site, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """A state folder others may write (/tmp, say) may hold a socket of theirs: its greeting
    may be a daemon's, but the pictures would go to them and the mattes come from them."""
    config = site.write_config()
    site.root.chmod(0o1777)
    path = socket_of(site)
    hello = {"model": handoff.model_identity(load_config(config).model), "precision": "fp32"}
    limits = {"max_pixels": 10**8, "max_batch": 8}
    greeting = handoff.GREETING + json.dumps({**hello, **limits}).encode() + b"\n"
    planted = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    planted.bind(str(path))
    os.chown(path, 65534, 65534)  # nobody's
    planted.listen(4)

    def answer() -> None:
        with contextlib.suppress(OSError):
            peer, _ = planted.accept()
            with peer:
                peer.sendall(greeting)
                peer.recv(1)

    threading.Thread(target=answer, daemon=True).start()
    inputs = photo_files(tmp_path / "photos", photos)[:1]
    try:
        result = matte(config, *inputs, outdir=tmp_path / "out")
    finally:
        planted.close()
    assert result.returncode == 0, result.stderr
    assert USING_DAEMON not in result.stderr
