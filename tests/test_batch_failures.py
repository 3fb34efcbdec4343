"""One bad file never fails its batch-mates; a broken device never blames the files.

The service's batch fallback is driven directly, with the real model wrapped so that it fails
the way a bad input or a lost GPU would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest

from hotfolder import config, imaging
from hotfolder.engine import MattingEngine
from hotfolder.service import Decoded, Service

from . import corpus
from .conftest import WEIGHTS
from .daemon import Site, photo_jpegs


class FailsOnWidth(MattingEngine):
    """The real model, except that it cannot take images of one width (a bad input)."""

    bad_width = 77

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        if any(image.shape[1] == self.bad_width for image in images):
            raise RuntimeError("cannot take this image")
        return super().predict(images)


class DeviceLost(MattingEngine):
    """The real model until the device goes away."""

    lost = False

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self.lost:
            raise RuntimeError("CUDA error: device lost")
        return super().predict(images)


def claimed_batch(service: Service, site: Site, images: list[bytes]) -> list[Decoded]:
    inbox = service.inboxes.start(service.config.inboxes)[0]
    batch = []
    for i, data in enumerate(images):
        corpus.write(site.inbox, f"f{i}.jpg", data)
        claim = inbox.claims.claim(f"f{i}.jpg", time.time())
        assert claim is not None
        service._count(+1)
        service._begin(claim)
        picture = imaging.decode(claim.source.read_bytes())
        batch.append(Decoded(inbox, claim, picture, "", 0.0, time.monotonic()))
    return batch


@pytest.fixture
def make_service(site: Site) -> Iterator[Callable[[type[MattingEngine]], Service]]:
    """A service (no threads, no observers) on the real model wrapped in ``engine_class``."""
    made: list[Service] = []

    def make(engine_class: type[MattingEngine]) -> Service:
        cfg = config.load(site.write_config())
        engine = engine_class("u2netp", WEIGHTS, device="cpu")
        engine.setup()
        made.append(Service(cfg, engine, once=True))
        return made[-1]

    yield make
    for service in made:
        service.inboxes.stop()
        service.journal.close()


def test_a_file_the_model_cannot_take_goes_to_errors_alone(
    site: Site, photos: dict[str, np.ndarray], make_service: Callable[..., Service]
) -> None:
    service = make_service(FailsOnWidth)
    images = photo_jpegs(photos, 3)
    images[1] = corpus.jpeg(photos["coffee"][:50, : FailsOnWidth.bad_width])
    results = service._infer(claimed_batch(service, site, images))
    assert [r.decoded.claim.relative for r in results] == ["f0.jpg", "f2.jpg"]
    assert [r.batch_size for r in results] == [1, 1]
    report = json.loads((site.errors / "f1.jpg.error.json").read_text())
    assert report["reason"] == "inference_failed"
    assert "cannot take this image" in report["message"]


def test_a_lost_device_puts_the_files_back_and_stops(
    site: Site, photos: dict[str, np.ndarray], make_service: Callable[..., Service]
) -> None:
    service = make_service(DeviceLost)
    batch = claimed_batch(service, site, photo_jpegs(photos, 3))
    assert isinstance(service.engine, DeviceLost)
    service.engine.lost = True
    with pytest.raises(RuntimeError, match="fails on a blank image"):
        service._infer(batch)
    assert sorted(p.name for p in site.inbox.glob("*.jpg")) == ["f0.jpg", "f1.jpg", "f2.jpg"]
    assert not site.errors.exists() or list(site.errors.iterdir()) == []
    assert service.in_flight == 0
