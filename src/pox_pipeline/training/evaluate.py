"""Stage `evaluate@<name>`: calibrate a trained model and choose its operating threshold on its
selection evidence, then report test metrics with bootstrap CIs, calibration, curves and
figures.

The evidence is the out-of-fold predictions over every non-test photo that ``train`` wrote
(``models/<name>/oof.csv``, ~180 photos on MSLD) or, for a model fitted on one fixed split,
the validation split. The temperature, the served threshold and the other operating points
(``evaluate.operating_points``, each with the rates it promises and their intervals) are all
set there, so the test figures are an honest estimate of the deployed decision; they travel to
the service through ``selection_metrics.json`` (``evidence`` says which), which ``select`` ships as
the model's metadata. Everything is logged to the MLflow run that trained the model
(``models/<name>/run.json``).
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from pox_pipeline.common import paths
from pox_pipeline.common.config import stage_entry
from pox_pipeline.common.reporting import interval_text, json_ready
from pox_pipeline.common.temperature import (
    CALIBRATION_METHODS,
    IDENTITY_TEMPERATURE,
    NO_CALIBRATION,
    class_probabilities,
)
from pox_pipeline.data.prepare import load_split, split_collections_of
from pox_pipeline.models.inference import load_keras_model, model_outputs
from pox_pipeline.training import metrics
from pox_pipeline.training.tracking import OUT_OF_FOLD_PROTOCOL, read_run_info, setup_mlflow

FIGURE_DPI = 100
# a title's lines wrap at this many characters per inch of figure width (medium font): a long
# model name is never cut off at both ends
TITLE_CHARS_PER_INCH = 9
MULTICLASS_RULE = "argmax"
MULTICLASS_NOTE = (
    "multi-class: the predicted class is the argmax of the softmax; evaluate.threshold "
    "applies to binary models only"
)
SPLITS = ("val", "test")
# selection_metrics.json's ``evidence`` after a refit: out-of-fold predictions over every
# non-test photo
OUT_OF_FOLD = "out_of_fold"


@dataclass(frozen=True)
class SplitScores:
    """Model outputs on one split: class-index labels and (N, C) class probabilities. A
    ``binary`` model (one sigmoid unit) is decided at a threshold on the positive class's
    column; a multi-class one (softmax) by argmax."""

    files: list[str]
    labels: np.ndarray
    proba: np.ndarray
    positive_index: int
    binary: bool

    @property
    def positive_score(self) -> np.ndarray:
        return self.proba[:, self.positive_index]

    @property
    def targets(self) -> np.ndarray:
        """Binary: 1 for the positive class, 0 otherwise; multi-class: the class indices."""
        if self.binary:
            return (self.labels == self.positive_index).astype(int)
        return self.labels

    def subset(self, indices: np.ndarray) -> SplitScores:
        """The images at ``indices`` (a bootstrap resample); file names are not carried."""
        return SplitScores([], self.labels[indices], self.proba[indices], self.positive_index,
                           self.binary)  # fmt: skip


def score_split(cfg: DictConfig, model: keras.Model, split: str) -> SplitScores:
    """Load a prepared split and run the model over it (uncalibrated outputs)."""
    images, labels, files = load_split(cfg, split)
    outputs = model_outputs(model, images, int(cfg.evaluate.batch_size), str(cfg.evaluate.tta))
    positive_index = list(cfg.data.classes).index(cfg.data.positive_class)
    relative = [os.path.relpath(f, cfg.paths.prepared_dir) for f in files]
    proba = class_probabilities(
        outputs, IDENTITY_TEMPERATURE, positive_index
    )
    return SplitScores(relative, np.asarray(labels), proba, positive_index,
                       binary=outputs.shape[1] == 1)  # fmt: skip


def evidence_scores(
    cfg: DictConfig, model: keras.Model, model_name: str
) -> tuple[SplitScores, np.ndarray | None]:
    """The scores every decision is set on, and each one's fold: the out-of-fold predictions
    over all non-test photos (``train.refit.folds`` >= 2), else the validation split's."""
    if read_run_info(cfg, model_name).get("protocol") != OUT_OF_FOLD_PROTOCOL:
        return score_split(cfg, model, "val"), None
    frame = pd.read_csv(paths.oof_file(cfg, model_name))
    outputs = frame[[c for c in frame.columns if c.startswith("output_")]].to_numpy(np.float64)
    positive_index = list(cfg.data.classes).index(cfg.data.positive_class)
    proba = class_probabilities(
        outputs, IDENTITY_TEMPERATURE, positive_index
    )
    scores = SplitScores(list(frame["file"]), frame["label"].to_numpy(np.int64), proba,
                         positive_index, binary=outputs.shape[1] == 1)  # fmt: skip
    return scores, frame["fold"].to_numpy(np.int64)


def fold_spread(
    scores: SplitScores, folds: np.ndarray, threshold: float | None, ece_bins: int
) -> dict[str, float]:
    """Each metric's mean over the folds and its standard error (sd / sqrt(folds)): how much
    a family's figure would move with other photos, which ``select``'s rule weighs."""
    per_fold = [split_metrics(scores.subset(np.flatnonzero(folds == k)), threshold, ece_bins)
                for k in np.unique(folds)]  # fmt: skip
    spread: dict[str, float] = {"folds": len(per_fold)}
    for name in per_fold[0]:
        values = np.array([fold[name] for fold in per_fold], dtype=np.float64)
        values = values[~np.isnan(values)]
        spread[f"{name}_fold_mean"] = float(values.mean()) if values.size else math.nan
        spread[f"{name}_fold_se"] = (
            float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else math.nan
        )
    return spread


def rates_with_ci(scores: SplitScores, threshold: float, cfg: DictConfig) -> dict[str, float]:
    """Sensitivity, specificity and balanced accuracy at ``threshold`` with bootstrap
    intervals: what an operating point promises (binary models)."""
    names = ("sensitivity", "specificity", "balanced_accuracy")

    def rates(indices: np.ndarray) -> dict[str, float]:
        point = metrics.binary_metrics(
            scores.targets[indices], scores.positive_score[indices], threshold
        )
        return {name: point[name] for name in names}

    point = rates(np.arange(len(scores.labels)))
    intervals = metrics.bootstrap_ci(
        rates, len(scores.labels), samples=int(cfg.evaluate.bootstrap.samples),
        confidence=float(cfg.evaluate.bootstrap.confidence), seed=int(cfg.seed),
    )  # fmt: skip
    flat: dict[str, float] = {}
    for name in names:
        flat[name] = point[name]
        flat[f"{name}_ci_low"] = intervals[name].low
        flat[f"{name}_ci_high"] = intervals[name].high
    return flat


def operating_points(
    evidence: SplitScores, test: SplitScores, cfg: DictConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``evaluate.operating_points``: each rule's threshold, chosen on the evidence, with the
    rates it promises there and (separately, never steering a choice) the test rates."""
    on_evidence, on_test = [], []
    for name, rule_cfg in cfg.evaluate.operating_points.items():
        rule = OmegaConf.to_container(rule_cfg, resolve=True)
        threshold = metrics.choose_threshold(evidence.targets, evidence.positive_score, rule)
        on_evidence.append({"name": name, "threshold": threshold,
                            **rates_with_ci(evidence, threshold, cfg)})  # fmt: skip
        on_test.append({"name": name, "threshold": threshold,
                        **rates_with_ci(test, threshold, cfg)})  # fmt: skip
    return on_evidence, on_test


def fit_calibration(scores: SplitScores, cfg: DictConfig) -> float:
    """The temperature of ``evaluate.calibration`` fitted on these (validation) scores;
    ``none`` is T = 1."""
    method = str(cfg.evaluate.calibration)
    if method == NO_CALIBRATION:
        return IDENTITY_TEMPERATURE
    if method == "temperature":
        return metrics.fit_temperature(
            scores.targets,
            scores.positive_score if scores.binary else scores.proba,
            list(cfg.evaluate.temperature_bounds),
            binary=scores.binary,
        )
    raise ValueError(
        f"evaluate.calibration={method!r}; choose one of {CALIBRATION_METHODS}"
    )


def calibrated(scores: SplitScores, temperature: float) -> SplitScores:
    """The same split with temperature-scaled probabilities (what the service shows)."""
    outputs = scores.positive_score if scores.binary else scores.proba
    proba = class_probabilities(outputs, temperature, scores.positive_index)
    return SplitScores(scores.files, scores.labels, proba, scores.positive_index, scores.binary)


def calibration_inputs(scores: SplitScores) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, outcome) whose agreement calibration measures.

    Binary: P(positive) against being positive, the probability the service shows next to
    its threshold. Multi-class: the top-class confidence against the argmax being right.
    """
    if scores.binary:
        return scores.positive_score, scores.targets
    return scores.proba.max(axis=1), (scores.proba.argmax(axis=1) == scores.labels).astype(int)


def split_ece(scores: SplitScores, n_bins: int) -> float:
    return metrics.expected_calibration_error(*calibration_inputs(scores), n_bins)


def split_metrics(scores: SplitScores, threshold: float | None, ece_bins: int) -> dict[str, float]:
    """Point metrics of one split (binary at ``threshold``, multi-class by argmax) and its
    expected calibration error."""
    if scores.binary:
        point = metrics.binary_metrics(scores.targets, scores.positive_score, threshold)
    else:
        point = metrics.multiclass_metrics(scores.labels, scores.proba, scores.positive_index)
    return {**point, "ece": split_ece(scores, ece_bins)}


def predicted_indices(scores: SplitScores, threshold: float | None) -> np.ndarray:
    """Class index decided for every image."""
    if not scores.binary:
        return scores.proba.argmax(axis=1)
    positive = scores.positive_index
    return np.where(scores.positive_score >= threshold, positive, 1 - positive)


def with_ci(scores: SplitScores, threshold: float | None, cfg: DictConfig) -> dict[str, float]:
    """Test metrics, each with its percentile bootstrap interval, as flat keys."""
    ece_bins = int(cfg.evaluate.ece_bins)
    point = split_metrics(scores, threshold, ece_bins)

    def resampled(indices: np.ndarray) -> dict[str, float]:
        return split_metrics(scores.subset(indices), threshold, ece_bins)

    intervals = metrics.bootstrap_ci(
        resampled,
        len(scores.labels),
        samples=int(cfg.evaluate.bootstrap.samples),
        confidence=float(cfg.evaluate.bootstrap.confidence),
        seed=int(cfg.seed),
    )
    flat: dict[str, float] = {}
    for name, value in point.items():
        flat[name] = value
        flat[f"{name}_ci_low"] = intervals[name].low
        flat[f"{name}_ci_high"] = intervals[name].high
    flat["bootstrap_samples"] = int(cfg.evaluate.bootstrap.samples)
    flat["bootstrap_confidence"] = float(cfg.evaluate.bootstrap.confidence)
    flat["bootstrap_min_resamples_used"] = min(ci.resamples_used for ci in intervals.values())
    return flat


def _write_json(path: Path, values: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(json_ready(values), indent=2) + "\n")


def set_title(fig: Figure, ax: Any, title: str) -> None:
    """``title`` wrapped to the figure's width (each of its lines on its own); the figure's
    tight_layout then makes room for the lines above the axes."""
    width = int(fig.get_figwidth() * TITLE_CHARS_PER_INCH)
    lines = [wrapped for line in title.splitlines()
             for wrapped in textwrap.wrap(line, width, break_on_hyphens=False)]  # fmt: skip
    ax.set_title("\n".join(lines), fontsize="medium")


def plot_confusion(matrix: np.ndarray, classes: list[str], title: str, path: Path) -> Figure:
    # a Figure without pyplot renders with Agg: no display, no global figure state
    fig = Figure(figsize=(4 + 0.5 * len(classes), 3.5 + 0.5 * len(classes)))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    for (row, col), count in np.ndenumerate(matrix):
        color = "white" if count > matrix.max() / 2 else "black"
        ax.text(col, row, str(count), ha="center", va="center", color=color)
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    set_title(fig, ax, title)
    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI)
    return fig


def plot_curve(
    x: pd.Series,
    y: pd.Series,
    axis_labels: tuple[str, str],
    title: str,
    path: Path,
    diagonal: bool = False,
) -> Figure:
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    ax.plot(x, y, lw=2)
    if diagonal:
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    set_title(fig, ax, title)
    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI)
    return fig


def plot_reliability(
    curves: Mapping[str, pd.DataFrame], axis_labels: tuple[str, str], title: str, path: Path
) -> Figure:
    """Reliability diagram: observed frequency against mean confidence in each non-empty bin,
    one line per curve (before / after calibration); the diagonal is perfect calibration."""
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for label, bins in curves.items():
        filled = bins[bins["count"] > 0]
        ax.plot(filled["confidence"], filled["frequency"], marker="o", lw=2, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    set_title(fig, ax, title)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI)
    return fig


def write_reliability(
    figures: Path,
    model_name: str,
    positive: str,
    raw: Mapping[str, SplitScores],
    scored: Mapping[str, SplitScores],
    temperature: float,
    n_bins: int,
) -> None:
    """``figures/reliability_<split>.png`` for val and test: the model's own probabilities
    and, when calibrated (T != 1), the temperature-scaled ones, each with its ECE."""
    axis_labels = (
        (f"mean predicted P({positive})", f"fraction {positive}")
        if raw["test"].binary
        else ("mean top-class confidence", "accuracy")
    )
    for split in SPLITS:
        versions = {"uncalibrated": raw[split]}
        if temperature != IDENTITY_TEMPERATURE:
            versions[f"T = {temperature:.2f}"] = scored[split]
        curves = {
            f"{label} (ECE {split_ece(scores, n_bins):.3f})":
            metrics.reliability_bins(*calibration_inputs(scores), n_bins)
            for label, scores in versions.items()
        }
        plot_reliability(
            curves,
            axis_labels,
            f"{model_name}: reliability, {split} ({n_bins} bins)",
            figures / f"reliability_{split}.png",
        )


def write_reports(
    out: Path,
    model_name: str,
    classes: list[str],
    test: SplitScores,
    predicted: np.ndarray,
    decision: str,
    test_auc: float,
) -> None:
    """predictions.csv, roc.csv, pr.csv, per_class.csv (multi-class) and the figures."""
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {
            "file": test.files,
            "actual": [classes[i] for i in test.labels],
            "predicted": [classes[i] for i in predicted],
            "probability": test.positive_score,
        }
    ).to_csv(out / "predictions.csv", index=False)
    positive_index = test.positive_index
    is_positive = (test.labels == positive_index).astype(int)
    roc = metrics.roc_points(is_positive, test.positive_score)
    pr = metrics.pr_points(is_positive, test.positive_score)
    roc.to_csv(out / "roc.csv", index=False)
    pr.to_csv(out / "pr.csv", index=False)
    if not test.binary:
        metrics.per_class_table(test.labels, test.proba, classes).to_csv(
            out / "per_class.csv", index=False
        )
    positive = classes[positive_index]
    auc = f"ROC AUC {test_auc:.3f}"
    plot_confusion(
        metrics.confusion_matrix(test.labels, predicted, len(classes)),
        classes,
        f"{model_name}: test confusion, {decision} ({auc})",
        figures / "confusion.png",
    )
    plot_curve(
        roc["fpr"],
        roc["tpr"],
        ("false positive rate", f"sensitivity ({positive})"),
        f"{model_name}: ROC, test ({auc})",
        figures / "roc.png",
        diagonal=True,
    )
    plot_curve(
        pr["recall"],
        pr["precision"],
        (f"recall ({positive})", "precision"),
        f"{model_name}: precision-recall, test ({auc})",
        figures / "pr.png",
    )


def log_to_mlflow(
    cfg: DictConfig, model_name: str, out: Path, val: Mapping[str, Any], test: Mapping[str, Any]
) -> None:
    """Log val_/test_ metrics, the threshold, the temperature and the figures to the model's
    training run."""
    setup_mlflow(cfg)
    run_id = read_run_info(cfg, model_name)["mlflow_run_id"]
    shared = ("threshold", "temperature")  # chosen on val, the same number in both files
    numeric = {
        **{f"val_{k}": v for k, v in val.items() if k not in shared},
        **{f"test_{k}": v for k, v in test.items() if k not in shared},
        **{f"test_{collection}_{k}": v
           for collection, figures in test.get("by_collection", {}).items()
           for k, v in figures.items()},
        **{k: val[k] for k in shared},
    }  # fmt: skip
    finite = {
        k: float(v)
        for k, v in numeric.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(finite)
        mlflow.set_tags({k: val[k] for k in ("threshold_rule", "calibration", "tta")})
        mlflow.set_tag("dvc_evaluate_stage", f"evaluate@{model_name}")
        mlflow.log_artifacts(str(out / "figures"), artifact_path="eval/figures")
        for name in (paths.SELECTION_METRICS_FILE, paths.TEST_METRICS_FILE):
            mlflow.log_artifact(str(out / name), artifact_path="eval")


def compared(
    cfg: DictConfig, val: Mapping[str, Any], test: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """The few figures per split (``evaluate.compare``) that DVC compares across experiments;
    intervals, counts and calibration stay in the full reports."""
    reports = {"val": val, "test": test}
    return {split: {name: reports[split][name] for name in names}
            for split, names in cfg.evaluate.compare.items()}  # fmt: skip


def by_collection(cfg: DictConfig, test: SplitScores, threshold: float | None) -> dict[str, Any]:
    """With several collections, the test figures of each one's own test photos: a pooled
    figure can hide a collection the model does much worse on."""
    collections = np.array(split_collections_of(cfg, "test"))
    names = list(dict.fromkeys(collections))
    if len(names) < 2:
        return {}
    return {"by_collection": {
        name: {"n_test": int((collections == name).sum()),
               **with_ci(test.subset(np.flatnonzero(collections == name)), threshold, cfg)}
        for name in names
    }}  # fmt: skip


def evaluate(cfg: DictConfig, model_name: str) -> dict[str, dict[str, Any]]:
    """Evaluate ``models/<model_name>/model.keras``; returns the written val and test metrics.

    "val" is the evidence the decisions are set on: the out-of-fold predictions over every
    non-test photo when the model was refitted after cross-validation, else the validation
    split (``evidence`` in the file says which)."""
    classes = list(cfg.data.classes)
    positive_index = classes.index(cfg.data.positive_class)
    model = load_keras_model(paths.model_file(cfg, model_name))
    evidence, folds = evidence_scores(cfg, model, model_name)
    raw = {"val": evidence, "test": score_split(cfg, model, "test")}
    # Calibrate first: the threshold and every metric use the probabilities the service shows.
    temperature = fit_calibration(raw["val"], cfg)
    scored = {split: calibrated(raw[split], temperature) for split in SPLITS}
    val, test = scored["val"], scored["test"]

    if test.binary:
        rule_cfg = OmegaConf.to_container(cfg.evaluate.threshold, resolve=True)
        threshold = metrics.choose_threshold(val.targets, val.positive_score, rule_cfg)
        rule = str(cfg.evaluate.threshold.rule)
        note = {}
        val_points, test_points = operating_points(val, test, cfg)
    else:
        threshold, rule, note = None, MULTICLASS_RULE, {"decision": MULTICLASS_NOTE}
        val_points, test_points = [], []

    ece_bins = int(cfg.evaluate.ece_bins)
    header = {
        "threshold": threshold,
        "threshold_rule": rule,
        "calibration": str(cfg.evaluate.calibration),
        "temperature": temperature,
        "tta": str(cfg.evaluate.tta),
        **note,
    }
    selection_metrics = {
        **header,
        "evidence": "validation" if folds is None else OUT_OF_FOLD,
        "n_val": len(val.labels),
        **with_ci(val, threshold, cfg),
        "ece_uncalibrated": split_ece(raw["val"], ece_bins),
        **({} if folds is None else fold_spread(val, folds, threshold, ece_bins)),
    }
    test_metrics = {
        **header,
        "n_test": len(test.labels),
        **with_ci(test, threshold, cfg),
        "ece_uncalibrated": split_ece(raw["test"], ece_bins),
        **by_collection(cfg, test, threshold),
    }

    out = paths.eval_dir(cfg, model_name)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(
        out / paths.SELECTION_METRICS_FILE, {**selection_metrics, "operating_points": val_points}
    )
    _write_json(out / paths.TEST_METRICS_FILE, {**test_metrics, "operating_points": test_points})
    _write_json(out / paths.DVC_METRICS_FILE, compared(cfg, selection_metrics, test_metrics))
    predicted = predicted_indices(test, threshold)
    decision = MULTICLASS_RULE if threshold is None else f"threshold {threshold:.3f}"
    write_reports(out, model_name, classes, test, predicted, decision, test_metrics["auc"])
    write_reliability(
        out / "figures", model_name, classes[positive_index], raw, scored, temperature, ece_bins
    )
    log_to_mlflow(cfg, model_name, out, selection_metrics, test_metrics)
    return {
        "val": {**json_ready(selection_metrics), "operating_points": val_points},
        "test": {**json_ready(test_metrics), "operating_points": test_points},
    }


def run(cfg: DictConfig) -> None:
    result = evaluate(cfg, cfg.model_name)
    test = result["test"]
    print(
        f"{cfg.model_name}: threshold {test['threshold']} ({test['threshold_rule']}), "
        f"temperature {test['temperature']:.3f} ({test['calibration']}), tta {test['tta']}, "
        f"test ECE {test['ece_uncalibrated']:.3f} -> {test['ece']:.3f}, test "
        + ", ".join(
            f"{m} {interval_text(test, m)}"
            for m in ("balanced_accuracy", "sensitivity", "specificity", "auc")
            if test[m] is not None and test[f"{m}_ci_low"] is not None
        )
    )


main = stage_entry(run)

if __name__ == "__main__":
    main()
