"""Turns at a shared model, in arrival order."""

from __future__ import annotations

import threading


class Turns:
    """A lock taken in arrival order: threads sharing the model (the daemon's batches, clients
    of its local socket) each wait at most one turn per caller ahead of them, never starve."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._changed:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._changed.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc: object) -> None:
        with self._changed:
            self._serving += 1
            self._changed.notify_all()
