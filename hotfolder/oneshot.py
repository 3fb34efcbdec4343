"""The model a one-shot ``hotfolder matte`` uses: a running daemon's, through its local socket,
else its own, loaded in the background while the first files decode."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from hotfolder import handoff

log = logging.getLogger(__name__)


class BackgroundModel:
    """A model made by ``make`` in a thread of its own from construction on; ``predict`` waits
    for it, and raises whatever ``make`` raised."""

    def __init__(self, make: Callable[[], handoff.Predictor]) -> None:
        pool = ThreadPoolExecutor(1, thread_name_prefix="load")
        self._model: Future[handoff.Predictor] = pool.submit(make)
        pool.shutdown(wait=False)

    def ready(self) -> handoff.Predictor:
        return self._model.result()

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.ready().predict(images)


class DaemonOrOwn:
    """The daemon's model while it answers; if it stops answering, the batch and all later ones
    run on a model of this process's own."""

    def __init__(self, client: handoff.Client, make_own: Callable[[], handoff.Predictor]) -> None:
        self.client: handoff.Client | None = client
        self.make_own = make_own
        self.own: BackgroundModel | None = None

    def ready(self) -> handoff.Predictor:
        return self

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self.client is not None:
            try:
                return self.client.predict(images)
            except (OSError, handoff.ProtocolError) as exc:
                log.warning("the daemon stopped answering (%s); loading the model here", exc)
                self.client.close()
                self.client = None
        if self.own is None:
            self.own = BackgroundModel(self.make_own)
        return self.own.predict(images)


def choose(
    state: Path, model: dict[str, object], make_own: Callable[[], handoff.Predictor]
) -> BackgroundModel | DaemonOrOwn:
    """The daemon's model when a daemon with state folder ``state`` answers and runs ``model``
    (a :func:`handoff.model_identity`); else this process's own, already loading when this
    returns."""
    path = handoff.socket_path(state)
    client = handoff.connect(path, lambda hello: hello.get("model") == model)
    if client is None:
        return BackgroundModel(make_own)
    log.info("using the model of the daemon at %s (%s)", path, client.hello.get("precision"))
    return DaemonOrOwn(client, make_own)
