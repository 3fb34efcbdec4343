"""Matte quality on real photos with ground truth (../shared/eval), against rembg's baseline."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hotfolder import evaluate, imaging
from hotfolder.engine import MattingEngine

from .conftest import ROOT

LOWER_IS_BETTER = {"SAD", "MSE", "Grad", "MAE"}


def baseline(shared_eval: Path) -> dict[str, dict[str, float]]:
    """rembg's scores per set from baseline.txt ("name (N pairs): SAD 38.616 MSE 61.976e-3 …")."""
    sets = {}
    for line in (shared_eval / "baseline.txt").read_text().splitlines():
        match = re.match(r"(\w+) \(\d+ pairs\):(.*)", line)
        if match:
            pairs = re.findall(r"(\w+) ([\d.]+(?:e-\d+)?)", match.group(2))
            sets[match.group(1)] = {name: float(value) for name, value in pairs}
    return sets


def assert_within_one_percent(scores: dict[str, float], reference: dict[str, float]) -> None:
    assert reference
    for name, theirs in reference.items():
        ours = scores[name]
        if name in LOWER_IS_BETTER:
            assert ours <= theirs * 1.01, (name, ours, theirs)
        else:
            assert ours >= theirs * 0.99, (name, ours, theirs)


def test_close_to_rembg_expected_outputs(engine: MattingEngine, shared_eval: Path) -> None:
    folder = shared_eval / "rembg_u2netp"
    with (folder / "pairs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows
    for row in rows:
        picture = imaging.decode((folder / row["image"]).read_bytes())
        alpha = engine.predict([picture.rgb])[0]
        expected = evaluate.read_truth(folder / row["gt"])
        assert np.abs(alpha.astype(int) - expected.astype(int)).mean() <= 2, row["image"]


def test_alpha_mattes_match_or_beat_rembg(shared_eval: Path, tmp_path: Path) -> None:
    """Through the command a person would run."""
    report = tmp_path / "scores.json"
    dataset = shared_eval / "alphamatting_lowres"
    subprocess.run(
        [sys.executable, "-m", "hotfolder", "eval", str(dataset), "--json", str(report)],
        check=True,
        cwd=ROOT,
    )
    scores = json.loads(report.read_text())[str(dataset)]
    assert scores["pairs"] == 13
    assert_within_one_percent(scores, baseline(shared_eval)["alphamatting_lowres"])


def test_salient_object_masks_match_or_beat_rembg(engine: MattingEngine, shared_eval: Path) -> None:
    scores = evaluate.evaluate(engine, shared_eval / "sod_bsds")
    assert scores["pairs"] == 100
    assert_within_one_percent(scores, baseline(shared_eval)["sod_bsds"])


@pytest.mark.parametrize("name", ["alphamatting_lowres", "sod_bsds"])
def test_baseline_file_is_understood(shared_eval: Path, name: str) -> None:
    assert len(baseline(shared_eval)[name]) == 3
