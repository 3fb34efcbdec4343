"""The systemd notify protocol (``Type=notify``, ``WatchdogSec=``), without libsystemd.

Messages are datagrams to the socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the
abstract namespace); outside systemd the variable is unset and every call does nothing. The
protocol is a few lines of socket code, so no binding to libsystemd (which needs its headers to
build) is worth its weight.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        # systemd asks for a ping at least every WATCHDOG_USEC; we send at half of it.
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        wanted = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_interval = int(usec) / 2e6 if wanted else 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, state: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(state.encode(), self.address)
        except OSError as exc:
            log.warning("cannot notify systemd (%s): %s", state, exc)
