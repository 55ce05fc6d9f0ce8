"""Cross-validation runner: every fold is run, summarised and logged."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import mlflow
import pytest

from pox_pipeline.common import paths
from pox_pipeline.data.synthetic import synthesize
from pox_pipeline.training.cv import cross_validate, fold_config, summarise


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
        "cv.folds=2", "cv.models=[cnn]", "model.cnn.epochs=1", "model.cnn.padding=same",
        "evaluate.bootstrap.samples=20",
        f"cv.out_dir={tmp_path}/cv", f"cv.work_dir={tmp_path}/cv-work",
    )  # fmt: skip
    synthesize(cfg)
    summaries = cross_validate(cfg)

    assert summaries["cnn"]["n_runs"] == 2
    written = json.loads((tmp_path / "cv" / "summary.json").read_text())
    runs = written["runs"]["cnn"]
    assert [run["fold"] for run in runs] == [0, 1]
    # each run is its fold's own evaluation, and the summary is the mean of the runs
    for run in runs:
        fold = fold_config(cfg, run["fold"], run["seed"])
        on_disk = json.loads((paths.eval_dir(fold, "cnn") / paths.TEST_METRICS_FILE).read_text())
        assert {m: run[m] for m in cfg.cv.metrics} == {m: on_disk[m] for m in cfg.cv.metrics}
    for metric in cfg.cv.metrics:
        values = [run[metric] for run in runs if run[metric] is not None]
        assert summaries["cnn"][f"{metric}_mean"] == pytest.approx(statistics.fmean(values))
        val_values = [run["val"][metric] for run in runs if run["val"][metric] is not None]
        assert summaries["cnn"][f"val_{metric}_mean"] == pytest.approx(statistics.fmean(val_values))
    assert "| cnn | 2 |" in (tmp_path / "cv" / "summary.md").read_text()
    assert json.loads((tmp_path / "cv" / "metrics.json").read_text()) == json.loads(
        json.dumps(summaries)
    )

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[cfg.mlflow.experiment], output_format="list")
    names = sorted(run.info.run_name for run in runs)
    assert names.count("train-cnn") == 2 and "cv-cnn" in names
    cv_run = next(run for run in runs if run.info.run_name == "cv-cnn")
    assert cv_run.data.metrics["balanced_accuracy_mean"] == pytest.approx(
        summaries["cnn"]["balanced_accuracy_mean"]
    )
    assert cv_run.info.status == "FINISHED"
    # the parent nests one child per fold and seed, each tagged with its data and fold
    children = [run for run in runs if run.info.run_name == "train-cnn"]
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {cv_run.info.run_id}
    [seed] = cfg.cv.seeds
    assert sorted(run.data.tags["cv_fold"] for run in children) == [f"{seed}/0", f"{seed}/1"]
    assert len({run.data.tags["split_sha256"] for run in children}) == 2  # two splits
    assert {run.data.tags["dataset_sha256"] for run in children} == {
        cv_run.data.tags["dataset_sha256"]
    }
    assert cv_run.data.params["cv.folds"] == "2"


def test_resplit_decides_whether_a_seed_redraws_the_folds(make_cfg) -> None:
    cfg = make_cfg("cv.folds=3", "seed=7")
    assert fold_config(cfg, 0, 1).data.split_seed == 1  # default: repeated k-fold
    fixed = make_cfg("cv.folds=3", "seed=7", "cv.resplit=false")
    assert fold_config(fixed, 0, 1).data.split_seed == 7  # folds of the base seed
    assert fold_config(fixed, 0, 1).seed == 1  # training still varies


def test_dvc_declares_no_metrics_that_dvc_repro_does_not_write() -> None:
    """cv's metrics file exists only after `python -m pox_pipeline.training.cv`: listed in
    dvc.yaml, its absence would make every `dvc metrics show` report a failed load."""
    from dvc.repo import Repo

    from pox_pipeline.common.params import project_root

    with Repo(str(project_root())) as repo:
        assert not any(repo.index._metrics.values())  # no top-level `metrics:`


def test_a_crashed_cross_validation_closes_its_parent_run_as_failed(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Left RUNNING, the MLflow UI shows a crashed cross-validation as still going."""
    from pox_pipeline.training import train

    cfg = make_cfg("cv.folds=2", "cv.models=[cnn]", f"cv.out_dir={tmp_path}/cv",
                   f"cv.work_dir={tmp_path}/cv-work")  # fmt: skip
    synthesize(cfg)

    def crash(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("out of memory in fold 0")

    monkeypatch.setattr(train, "train", crash)
    with pytest.raises(RuntimeError, match="fold 0"):
        cross_validate(cfg)
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    [parent] = mlflow.search_runs(experiment_names=[cfg.mlflow.experiment], output_format="list")
    assert parent.info.run_name == "cv-cnn" and parent.info.status == "FAILED"
