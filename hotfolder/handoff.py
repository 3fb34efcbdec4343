"""The daemon's warm model for ``hotfolder matte`` on the same host, over a Unix socket.

A running daemon listens on ``hotfolder.sock`` in its state folder (beside the journal); there is
no network listener. Who may connect is decided by the socket file's mode and group, which are
those of the daemon's own folders. ``hotfolder matte`` decodes and writes its files itself and
sends only pictures; it gets mattes back, so a file never passes through the daemon's folders.

Protocol (all integers big-endian uint32)::

    server, on connect:  b"HOTFOLDER1 " + JSON + b"\\n", the JSON an object of the daemon's
                         "model" (see :func:`model_identity`), "precision", "max_pixels"
                         and "max_batch"
    request:             b"MAT1", count, then per picture: height, width, RGB bytes (H×W×3);
                         at most max_batch pictures and max_pixels pixels in all, as the
                         greeting said (a reload of the config changes them for new
                         connections)
    reply, per picture:  b"OK  ", H×W, alpha bytes (H×W)   or   b"ERR ", length, UTF-8 message

A request that breaks the protocol or the limits gets one ``ERR`` and the connection is closed;
nothing a client sends can stop the daemon. This module imports no PyTorch: a client that finds a
daemon starts in a fraction of the time a model takes to load.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from hotfolder import publish, runtime

if TYPE_CHECKING:
    from hotfolder.config import ModelConfig

log = logging.getLogger(__name__)

SOCKET_NAME = "hotfolder.sock"
GREETING = b"HOTFOLDER1 "
REQUEST = b"MAT1"
OK, ERR = b"OK  ", b"ERR "
MAX_CONNECTIONS = 4  # clients served at once; more are told the daemon is busy
IDLE_TIMEOUT = 60.0  # seconds a connection may stay silent mid-request or between requests
CONNECT_TIMEOUT = 2.0  # seconds a client waits for a daemon's greeting
# Seconds a client waits for a reply: a batch may wait behind the daemon's own batches.
REPLY_TIMEOUT = 600.0


class Predictor(Protocol):
    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]: ...


class ProtocolError(Exception):
    """A peer broke the protocol or the limits; the message says how."""


def socket_path(state: Path) -> Path:
    """The socket of the daemon whose state folder (the journal's folder) is ``state``."""
    return state / SOCKET_NAME


def model_identity(model: ModelConfig) -> dict[str, object]:
    """What decides a model's mattes, as a daemon announces it and ``hotfolder matte`` compares
    it with its own config: the same name is not the same model. The weights file counts by
    path, size and modification time (a file replaced since the daemon loaded it is another
    model); device and precision count as configured, since the same settings resolve the same
    way on the same host."""
    weights = model.weights.resolve()
    try:
        found = weights.stat()
        version: list[int] = [found.st_size, found.st_mtime_ns]
    except OSError:
        version = []
    return {
        "name": model.name,
        "weights": [str(weights), *version],
        "device": model.device,
        "precision": model.precision,
        "runtime": runtime.choose(model),  # as resolved: auto and its choice are the same model
        "flip_average": model.flip_average,
    }


# ----- the daemon's side ----------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What one request may hold: pictures, and pixels in all."""

    max_pixels: int
    max_batch: int


class Server:
    """Serves ``predictor`` on a Unix socket from a thread of its own, one thread per client.
    ``predictor.predict`` must be safe to call from several threads (the engine's is: callers
    take turns in arrival order, so inbox batches and clients' batches alternate)."""

    def __init__(
        self,
        path: Path,
        predictor: Predictor,
        hello: dict[str, object],
        limits: Callable[[], Limits],
        permissions: publish.Permissions = publish.DEFAULT_PERMISSIONS,
    ) -> None:
        self.path = path
        self.predictor = predictor
        self.hello = hello
        self.limits = limits
        self.permissions = permissions
        self._listener: socket.socket | None = None
        self._inode: int | None = None
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._closing = threading.Event()

    def start(self) -> bool:
        """Bind and start accepting; False (logged) when the socket cannot be served, e.g.
        another daemon already serves it. The daemon runs on either way."""
        try:
            if not self._take_over_stale():
                return False
            self._listener = self._bind()
        except OSError as exc:
            log.warning("no local socket at %s: %s", self.path, exc.strerror or exc)
            return False
        threading.Thread(target=self._accept_loop, name="handoff", daemon=True).start()
        log.info("serving the model to hotfolder matte on %s", self.path)
        return True

    def close(self) -> None:
        """Stop accepting and remove the socket file, if it is still ours."""
        self._closing.set()
        if self._listener is None:
            return
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self._inode:
                self.path.unlink()

    def _take_over_stale(self) -> bool:
        """A socket file left by a daemon that was killed is removed; one that answers belongs
        to a daemon still running (False); anything else at that name is left alone (OSError)."""
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return True
        if not stat.S_ISSOCK(mode):
            raise OSError(errno.EEXIST, f"{self.path} exists and is no socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing the stale socket %s (its daemon is gone)", self.path)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return True
        finally:
            probe.close()
        log.warning("another daemon serves %s; this one serves no local socket", self.path)
        return False

    def _bind(self) -> socket.socket:
        """Bound under a temporary name, given its mode and group, then renamed into place:
        the socket never answers under its real name with other permissions."""
        temporary = self.path.with_name(f".{SOCKET_NAME}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(temporary))
            # Connecting takes write permission: the same people who may write the daemon's
            # folders may use its model.
            os.chmod(temporary, self.permissions.dir_mode & 0o777)
            if self.permissions.gid is not None:
                os.chown(temporary, -1, self.permissions.gid)
            listener.listen(MAX_CONNECTIONS)
            os.rename(temporary, self.path)
        except OSError:
            listener.close()
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        self._inode = os.lstat(self.path).st_ino
        return listener

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                if self._closing.is_set():
                    return
                continue  # e.g. EMFILE for a moment: the listener itself is fine
            if not self._slots.acquire(blocking=False):
                with contextlib.suppress(OSError):
                    send_error(client, "the daemon is serving other clients")
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), name="handoff-client",
                             daemon=True).start()  # fmt: skip

    def _serve(self, client: socket.socket) -> None:
        # The limits of the config running when the client connected (a reload changes them),
        # for the whole connection: the client splits its batches by those it was told.
        limits = self.limits()
        hello = {**self.hello, "max_pixels": limits.max_pixels, "max_batch": limits.max_batch}
        try:
            client.settimeout(IDLE_TIMEOUT)
            client.sendall(GREETING + json.dumps(hello).encode() + b"\n")
            while not self._closing.is_set() and self._serve_request(client, limits):
                pass
        except ProtocolError as exc:
            log.warning("local socket: refused a request: %s", exc)
            with contextlib.suppress(OSError):
                send_error(client, str(exc))
        except OSError:
            pass  # the client went away or fell silent: only its connection ends
        except Exception:
            log.exception("local socket: a request failed")
        finally:
            client.close()
            self._slots.release()

    def _serve_request(self, client: socket.socket, limits: Limits) -> bool:
        """One request and its replies; False when the client closed the connection."""
        head = receive_or_end(client, 8)
        if head is None:
            return False
        magic, count = head[:4], struct.unpack("!I", head[4:])[0]
        if magic != REQUEST:
            raise ProtocolError("not a hotfolder request")
        if not 0 < count <= limits.max_batch:
            raise ProtocolError(f"{count} pictures in a request; at most {limits.max_batch}")
        pictures: list[np.ndarray] = []
        for _ in range(count):
            # A request holds at most max_pixels in all: one client never makes the daemon
            # hold more than one picture of the largest size it accepts.
            room = limits.max_pixels - sum(p.shape[0] * p.shape[1] for p in pictures)
            pictures.append(receive_picture(client, room, limits.max_pixels))
        try:
            alphas = self.predictor.predict(pictures)
        except Exception as exc:
            log.warning("local socket: inference failed: %s", exc)
            for _ in pictures:
                send_error(client, f"inference failed: {exc}")
            return True
        for alpha in alphas:
            client.sendall(OK + struct.pack("!I", alpha.size) + alpha.tobytes())
        return True


def receive_picture(client: socket.socket, room: int, max_pixels: int) -> np.ndarray:
    """One RGB picture (H, W, 3) uint8 of at most ``room`` pixels; ProtocolError otherwise."""
    height, width = struct.unpack("!II", receive(client, 8))
    if not (height > 0 and width > 0 and height * width <= room):
        raise ProtocolError(f"a {width}×{height} picture; at most {max_pixels} pixels in a request")
    data = receive(client, height * width * 3)
    return np.frombuffer(data, np.uint8).reshape(height, width, 3)


def send_error(client: socket.socket, message: str) -> None:
    data = message.encode()
    client.sendall(ERR + struct.pack("!I", len(data)) + data)


def receive(peer: socket.socket, size: int) -> bytearray:
    """Exactly ``size`` bytes; ProtocolError if the stream ends first."""
    data = receive_or_end(peer, size)
    if data is None:
        raise ProtocolError("connection closed mid-message")
    return data


def receive_or_end(peer: socket.socket, size: int) -> bytearray | None:
    """Exactly ``size`` bytes, or None at a clean end of stream before the first byte; an end
    of stream after it is a ProtocolError. Writable, so that arrays over it are (PyTorch warns
    of read-only ones), and not copied: a picture may be hundreds of megabytes."""
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = peer.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return None
            raise ProtocolError("connection closed mid-message")
        got += n
    return buffer


# ----- hotfolder matte's side -----------------------------------------------------------------


class Client:
    """A connection to a daemon's model: ``predict`` as the engine's, over the socket."""

    def __init__(self, peer: socket.socket, hello: dict[str, object]) -> None:
        self.peer = peer
        self.hello = hello

    @property
    def max_pixels(self) -> int:
        return int(str(self.hello.get("max_pixels", 0)))

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Alpha mattes (H, W) uint8 for RGB pictures (H, W, 3) uint8. OSError or
        ProtocolError if the daemon fails or goes away."""
        alphas: list[np.ndarray] = []
        for group in self._requests(images):
            alphas += self._request(group)
        return alphas

    def _requests(self, images: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        """``images`` in groups the daemon accepts: at most ``max_pixels`` in all and
        ``max_batch`` pictures."""
        groups: list[list[np.ndarray]] = []
        room = 0
        most = int(str(self.hello.get("max_batch", 1)))
        for image in images:
            pixels = image.shape[0] * image.shape[1]
            if not groups or pixels > room or len(groups[-1]) >= most:
                groups.append([])
                room = self.max_pixels
            groups[-1].append(image)
            room -= pixels
        return groups

    def _request(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        self.peer.sendall(REQUEST + struct.pack("!I", len(images)))
        for image in images:
            height, width = image.shape[:2]
            self.peer.sendall(struct.pack("!II", height, width))
            self.peer.sendall(np.ascontiguousarray(image, np.uint8).data)
        return [self._reply(image.shape[:2]) for image in images]

    def _reply(self, shape: tuple[int, ...]) -> np.ndarray:
        head = receive(self.peer, 8)
        size = struct.unpack("!I", head[4:])[0]
        data = receive(self.peer, size)
        if head[:4] == ERR:
            raise ProtocolError(f"the daemon refused: {data.decode(errors='replace')}")
        if head[:4] != OK or size != shape[0] * shape[1]:
            raise ProtocolError("the daemon's reply does not fit the request")
        return np.frombuffer(data, np.uint8).reshape(shape)

    def close(self) -> None:
        self.peer.close()


def trusted(path: Path) -> bool:
    """Whether the socket at ``path`` is this user's, root's or its folder owner's (the
    daemon's). In a folder others may write, anyone could have left a socket there that
    greets like a daemon, to receive the pictures and send back mattes of its own."""
    owner = os.lstat(path).st_uid
    return owner in (os.geteuid(), 0, os.stat(path.parent).st_uid)


def connect(path: Path, accept: Callable[[dict[str, object]], bool]) -> Client | None:
    """A connection to the daemon serving ``path``, if it is :func:`trusted`, answers and
    ``accept``s its greeting (its model, precision and pixel limit); None otherwise."""
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if not trusted(path):
            log.debug("not using %s: its owner is neither this user, root nor the owner of "
                      "its folder", path)  # fmt: skip
            raise ProtocolError("a stranger's socket")
        peer.settimeout(CONNECT_TIMEOUT)
        peer.connect(str(path))
        greeting = peer.makefile("rb").readline(64 * 1024)
        if not greeting.startswith(GREETING):  # e.g. ERR: busy
            raise ProtocolError("no greeting")
        hello = json.loads(greeting[len(GREETING) :] or b"{}")
        line = hello if isinstance(hello, dict) else {}
    except (OSError, ProtocolError, ValueError):
        peer.close()
        return None
    if not accept(line):
        peer.close()
        return None
    peer.settimeout(REPLY_TIMEOUT)
    return Client(peer, line)
