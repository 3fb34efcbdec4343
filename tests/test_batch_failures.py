"""One bad file never fails its batch-mates; a broken device never blames the files.

The infer stage is driven directly, outside any daemon, with the real model wrapped so that it
fails the way a bad input or a lost GPU would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest

from hotfolder import config, imaging
from hotfolder.engine import MattingEngine
from hotfolder.inboxes import Inbox, InboxSet
from hotfolder.journal import Journal
from hotfolder.metrics import Metrics
from hotfolder.outcomes import Outcomes
from hotfolder.pipeline import Decoded, Pipeline
from hotfolder.stages.infer import Infer

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


def claimed_batch(infer: Infer, site: Site, images: list[bytes]) -> list[Decoded]:
    inbox = infer.pipeline.inboxes.active[0]
    batch = []
    for i, data in enumerate(images):
        corpus.write(site.inbox, f"f{i}.jpg", data)
        claim = inbox.claims.claim(f"f{i}.jpg", time.time())
        assert claim is not None
        infer.outcomes.begin(claim)
        picture = imaging.decode(claim.source.read_bytes())
        batch.append(Decoded(inbox, claim, picture, "", 0.0, time.monotonic()))
    return batch


@pytest.fixture
def make_stage(site: Site) -> Iterator[Callable[[type[MattingEngine]], Infer]]:
    """The infer stage (no threads, no observers) on the real model wrapped in
    ``engine_class``."""
    made: list[Pipeline] = []

    def make(engine_class: type[MattingEngine]) -> Infer:
        cfg = config.load(site.write_config())
        config.ensure_folders(cfg)
        engine = engine_class("u2netp", WEIGHTS, device="cpu")
        engine.setup()
        metrics = Metrics()
        inboxes = InboxSet(lambda c: Inbox(c, 1.0, False, lambda *a: None, lambda n: None))
        for inbox_config in cfg.inboxes:
            metrics.add_inbox(inbox_config.name)
        inboxes.start(cfg.inboxes)
        pipeline = Pipeline(cfg, engine, metrics, Journal(cfg.journal), inboxes, once=True)
        made.append(pipeline)
        return Infer(pipeline, Outcomes(pipeline))

    yield make
    for pipeline in made:
        pipeline.inboxes.stop()
        pipeline.journal.close()


def test_a_file_the_model_cannot_take_goes_to_errors_alone(
    site: Site, photos: dict[str, np.ndarray], make_stage: Callable[..., Infer]
) -> None:
    infer = make_stage(FailsOnWidth)
    images = photo_jpegs(photos, 3)
    images[1] = corpus.jpeg(photos["coffee"][:50, : FailsOnWidth.bad_width])
    results = infer.infer(claimed_batch(infer, site, images))
    assert [r.decoded.claim.relative for r in results] == ["f0.jpg", "f2.jpg"]
    assert [r.batch_size for r in results] == [1, 1]
    report = json.loads((site.errors / "f1.jpg.error.json").read_text())
    assert report["reason"] == "inference_failed"
    assert "cannot take this image" in report["message"]


def test_a_lost_device_puts_the_files_back_and_stops(
    site: Site, photos: dict[str, np.ndarray], make_stage: Callable[..., Infer]
) -> None:
    infer = make_stage(DeviceLost)
    batch = claimed_batch(infer, site, photo_jpegs(photos, 3))
    engine = infer.pipeline.engine
    assert isinstance(engine, DeviceLost)
    engine.lost = True
    with pytest.raises(RuntimeError, match="fails on a blank image"):
        infer.infer(batch)
    assert sorted(p.name for p in site.inbox.glob("*.jpg")) == ["f0.jpg", "f1.jpg", "f2.jpg"]
    assert not site.errors.exists() or list(site.errors.iterdir()) == []
    assert infer.pipeline.in_flight == 0
