"""The helpers every layer shares for reports and photo folders: one home each, one behaviour."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pox_pipeline.common.params import load_params, project_root
from pox_pipeline.common.preprocess import PHOTO_SUFFIXES, photo_files
from pox_pipeline.common.reporting import interval, interval_text, json_ready, undefined


def test_undefined_metrics_become_null_at_any_depth() -> None:
    assert [undefined(v) for v in (None, math.nan, np.float32("nan"), 0.0, 1, True, "n")] == [
        True, True, True, False, False, False, False,
    ]  # fmt: skip
    ready = json_ready({"auc": math.nan, "n": 3, "nested": {"ece": np.float64("nan")}})
    assert ready == {"auc": None, "n": 3, "nested": {"ece": None}}
    json.dumps(ready, allow_nan=False)  # strict JSON


def test_interval_text() -> None:
    values = {"auc": 0.714, "auc_ci_low": 0.5, "auc_ci_high": 0.895, "ece": 0.1,
              "sensitivity": math.nan, "specificity": 0.8, "specificity_ci_low": math.nan,
              "specificity_ci_high": math.nan}  # fmt: skip
    assert interval_text(values, "auc") == "0.714 [0.500, 0.895]"
    assert interval(values, "auc") == (0.5, 0.895)
    assert interval_text(values, "ece") == "0.100"  # no interval computed
    assert interval_text(values, "specificity") == "0.800"  # an undefined interval
    assert interval_text(values, "sensitivity") == "n/a"
    assert interval_text(values, "absent") == "n/a"


def test_photo_files_lists_every_depth_in_path_order_any_case(tmp_path: Path) -> None:
    for name in ("b/2.JPG", "a/deep/1.png", "a/0.webp", "notes.txt", "c/3.heic"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert photo_files(tmp_path) == [tmp_path / "a/0.webp", tmp_path / "a/deep/1.png",
                                     tmp_path / "b/2.JPG"]  # fmt: skip
    assert photo_files(tmp_path, [".PNG"]) == [tmp_path / "a/deep/1.png"]


def test_photo_suffixes_are_the_configured_default() -> None:
    """conf/data's image_extensions (what prepare takes) and the listing's default agree."""
    params = load_params(project_root() / "params.yaml")
    assert tuple(params.data.image_extensions) == PHOTO_SUFFIXES
