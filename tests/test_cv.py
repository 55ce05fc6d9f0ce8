"""Cross-validation runner: every fold is run, summarised and logged."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import mlflow
import pytest

from pox_pipeline.cv import cross_validate, fold_config, summarise
from pox_pipeline.synthetic import synthesize


def test_summarise_mean_and_std() -> None:
    runs = [{"auc": 0.5}, {"auc": 0.7}, {"auc": 0.9}, {"auc": None}]
    summary = summarise(runs, ["auc"])
    assert summary["n_runs"] == 4
    assert summary["auc_mean"] == pytest.approx(0.7)
    assert summary["auc_std"] == statistics.stdev([0.5, 0.7, 0.9])


def test_fold_configs_are_isolated(make_cfg) -> None:
    cfg = make_cfg("cv.folds=3")
    first, second = fold_config(cfg, 0, 1), fold_config(cfg, 1, 1)
    assert (first.data.folds, first.data.fold, second.data.fold) == (3, 0, 1)
    assert first.seed == 1
    assert first.paths.prepared_dir != second.paths.prepared_dir
    assert first.paths.models_dir != second.paths.models_dir


def test_cross_validate_runs_every_fold(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        "cv.folds=2", "cv.models=[cnn]", "model.cnn.epochs=1", "model.cnn.padding=same", "evaluate.bootstrap.samples=20",
        f"cv.out_dir={tmp_path}/cv", f"cv.work_dir={tmp_path}/cv-work",
    )  # fmt: skip
    synthesize(cfg)
    summaries = cross_validate(cfg)

    assert summaries["cnn"]["n_runs"] == 2
    assert 0.0 <= summaries["cnn"]["balanced_accuracy_mean"] <= 1.0
    written = json.loads((tmp_path / "cv" / "summary.json").read_text())
    assert [run["fold"] for run in written["runs"]["cnn"]] == [0, 1]
    assert "| cnn | 2 |" in (tmp_path / "cv" / "summary.md").read_text()
    assert json.loads((tmp_path / "cv" / "metrics.json").read_text()) == json.loads(
        json.dumps(summaries)
    )

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[cfg.mlflow.experiment], output_format="list")
    names = sorted(run.info.run_name for run in runs)
    assert names.count("train-cnn") == 2 and "cv-cnn" in names
    cv_run = next(run for run in runs if run.info.run_name == "cv-cnn")
    assert "balanced_accuracy_mean" in cv_run.data.metrics


def test_resplit_decides_whether_a_seed_redraws_the_folds(make_cfg) -> None:
    cfg = make_cfg("cv.folds=3", "seed=7")
    assert fold_config(cfg, 0, 1).data.split_seed == 1  # default: repeated k-fold
    fixed = make_cfg("cv.folds=3", "seed=7", "cv.resplit=false")
    assert fold_config(fixed, 0, 1).data.split_seed == 7  # folds of the base seed
    assert fold_config(fixed, 0, 1).seed == 1  # training still varies


def test_dvc_shows_the_default_cv_metrics_file() -> None:
    """dvc.yaml's top-level `metrics:` names the file cv writes with the default cv.out_dir."""
    import yaml

    from pox_pipeline.config import compose, project_root
    from pox_pipeline.cv import DVC_METRICS_FILE

    listed = yaml.safe_load((project_root() / "dvc.yaml").read_text())["metrics"]
    assert str(Path(compose([]).cv.out_dir) / DVC_METRICS_FILE) in listed
