"""Issue 3's check on real data: the tutorial CNN, trained briefly on MSLD, classifies
photos of unseen patients better than always answering the majority class.

Opt-in (``-m slow``, 85 s on 2 cores): 3 patient-grouped folds, the tutorial CNN
with its default config, every image scored once by the fold model that never saw its
patient, at the plain 0.5 threshold. The 23-image fixed validation split is too small for
this question (one image is 4 points), so the test pools all 228 held-out predictions and
asks for a one-sided binomial test against the majority rate.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig
from scipy.stats import binomtest

from conftest import MSLD_DIR, requires_msld
from pox_pipeline.cv import cross_validate, fold_config

SIGNIFICANCE = 0.05


@pytest.mark.slow
@requires_msld
def test_tutorial_cnn_beats_the_majority_rate_on_unseen_patients(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = make_cfg(
        "data=msld", f"data.raw_dir={MSLD_DIR}", "data.image_size=224", "cv.folds=3",
        "cv.models=[cnn]", "evaluate.threshold.rule=fixed", "evaluate.bootstrap.samples=20",
        "train.verbose=0", f"cv.out_dir={tmp_path}/cv", f"cv.work_dir={tmp_path}/cv-work",
    )  # fmt: skip
    cross_validate(cfg)

    runs = json.loads((tmp_path / "cv" / "summary.json").read_text())["runs"]["cnn"]
    n = sum(run["n_test"] for run in runs)
    correct = sum(round(run["accuracy"] * run["n_test"]) for run in runs)
    manifest = Path(fold_config(cfg, 0, cfg.seed).paths.prepared_dir) / "manifest.csv"
    with manifest.open() as handle:
        classes = Counter(row["class"] for row in csv.DictReader(handle))
    majority = max(classes.values()) / sum(classes.values())
    assert n == sum(classes.values())  # every image scored once, by a model that never saw it
    result = binomtest(correct, n, majority, alternative="greater")
    print(f"cnn on unseen patients: {correct}/{n} = {correct / n:.3f} correct at 0.5, majority "
          f"rate {majority:.3f}, one-sided binomial p = {result.pvalue:.2g}")  # -s shows it
    assert result.pvalue < SIGNIFICANCE, (correct, n, majority, result.pvalue)
