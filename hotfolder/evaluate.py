"""Quality evaluation on a ``pairs.csv`` dataset (image, ground truth, gt_type per row).

Soft alpha mattes are scored as on alphamatting.com (SAD, MSE, Grad); binary salient-object masks
as in the salient-object-detection literature (MAE, max F-measure, S-measure, via pysodmetrics).
Each metric is the mean over the images of the set.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from hotfolder import imaging
from hotfolder.runtime import Engine

GRAD_SIGMA = 1.4


@dataclass(frozen=True)
class Pair:
    image: Path
    truth: Path
    soft: bool  # a true alpha matte, rather than a binary mask


def read_pairs(dataset: Path) -> list[Pair]:
    with (dataset / "pairs.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [
        Pair(dataset / row["image"], dataset / row["gt"], "binary" not in row["gt_type"])
        for row in rows
    ]


def read_truth(path: Path) -> np.ndarray:
    """The ground truth as (H, W) uint8: a gray PNG, or the alpha of an RGBA one."""
    with Image.open(path) as image:
        if image.mode in ("RGBA", "LA"):
            return np.asarray(image.getchannel("A"))
        return np.asarray(image.convert("L"))


def soft_alpha_scores(alpha: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    from scipy import ndimage

    a = alpha.astype(np.float64) / 255
    g = truth.astype(np.float64) / 255

    def gradient_magnitude(x: np.ndarray) -> np.ndarray:
        return np.asarray(ndimage.gaussian_gradient_magnitude(x, sigma=GRAD_SIGMA))

    grad = np.sum((gradient_magnitude(a) - gradient_magnitude(g)) ** 2)
    return {
        "SAD": float(np.abs(a - g).sum() / 1000),
        "MSE": float(np.mean((a - g) ** 2)),
        "Grad": float(grad / 1000),
    }


def mask_scores(alphas: list[np.ndarray], truths: list[np.ndarray]) -> dict[str, float]:
    import py_sod_metrics as sod

    handler = sod.FmeasureHandler(with_dynamic=True, with_adaptive=False, beta=0.3)
    mae, smeasure = sod.MAE(), sod.Smeasure()
    fmeasure = sod.FmeasureV2(metric_handlers={"fm": handler})
    for alpha, truth in zip(alphas, truths, strict=True):
        for metric in (mae, fmeasure, smeasure):
            metric.step(pred=alpha, gt=truth)
    return {
        "MAE": float(mae.get_results()["mae"]),
        "maxF": float(fmeasure.get_results()["fm"]["dynamic"].max()),
        "S": float(smeasure.get_results()["sm"]),
    }


def predict_pairs(
    engine: Engine, pairs: list[Pair], batch_size: int
) -> Iterator[tuple[Pair, np.ndarray]]:
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        pictures = [imaging.decode(pair.image.read_bytes()) for pair in chunk]
        yield from zip(chunk, engine.predict([p.rgb for p in pictures]), strict=True)


def evaluate(engine: Engine, dataset: Path, batch_size: int = 8) -> dict[str, float]:
    """Mean metrics over the dataset; the soft-alpha or the mask set, by its gt_type."""
    pairs = read_pairs(dataset)
    if not pairs:
        raise ValueError(f"{dataset}/pairs.csv lists no pairs")
    alphas, truths = [], []
    for pair, alpha in predict_pairs(engine, pairs, batch_size):
        truth = read_truth(pair.truth)
        if truth.shape != alpha.shape:
            raise ValueError(
                f"{pair.truth}: size {truth.shape} differs from the image's {alpha.shape}"
            )
        alphas.append(alpha)
        truths.append(truth)
    scores: dict[str, float] = {"pairs": len(pairs)}
    if all(pair.soft for pair in pairs):
        per_image = [soft_alpha_scores(a, t) for a, t in zip(alphas, truths, strict=True)]
        for name in per_image[0]:
            scores[name] = float(np.mean([s[name] for s in per_image]))
    else:
        scores.update(mask_scores(alphas, truths))
    return scores
