"""Classification metrics, bootstrap confidence intervals, threshold rules and calibration.

Pure numpy / scikit-learn: no model, no files. Binary functions take ``y_true`` as 1 for the
positive class (``data.positive_class``) and 0 otherwise, and ``score`` as P(positive); a
sample is called positive when ``score >= threshold``. A metric that is undefined on the
given labels (sensitivity without positives, AUC with one class) is ``nan``, never a guess.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from sklearn.metrics import precision_recall_curve, roc_curve

from pox_pipeline.common.temperature import PROBABILITY_EPS, binary_logits, log_probabilities

BINARY_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "auc",
    "log_loss",
)
MULTICLASS_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "macro_precision",
    "macro_recall",
    "macro_f1",
    "macro_specificity",
    "auc",
    "log_loss",
)
THRESHOLD_RULES = ("sensitivity_target", "fixed", "youden")


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else math.nan


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, int]:
    """TP/FP/TN/FN of binary 0/1 labels and decisions (1 = positive class)."""
    y_true = np.asarray(y_true).astype(bool)
    y_pred = np.asarray(y_pred).astype(bool)
    return {
        "tp": int(np.sum(y_true & y_pred)),
        "fp": int(np.sum(~y_true & y_pred)),
        "tn": int(np.sum(~y_true & ~y_pred)),
        "fn": int(np.sum(y_true & ~y_pred)),
    }


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``matrix[actual, predicted]`` counts for class indices ``0..n_classes-1``."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    return matrix


def rates_from_counts(tp: int, fp: int, tn: int, fn: int) -> dict[str, float]:
    """Threshold metrics from confusion counts (``nan`` where a denominator is zero)."""
    sensitivity = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    return {
        "accuracy": _ratio(tp + tn, tp + fp + tn + fn),
        "balanced_accuracy": (sensitivity + specificity) / 2.0,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Binary ROC AUC, ``nan`` when only one class is present.

    The Mann-Whitney rank form (ties count half), equal to ``sklearn.metrics.roc_auc_score``
    but without its input validation, which dominated the bootstrap's run time.
    """
    is_positive = np.asarray(y_true).astype(bool)
    n_positive = int(is_positive.sum())
    n_negative = is_positive.size - n_positive
    if n_positive == 0 or n_negative == 0:
        return math.nan
    # 1-based ranks of the scores, tied scores sharing their average rank
    _, tie_group, tie_counts = np.unique(
        np.asarray(score, dtype=np.float64), return_inverse=True, return_counts=True
    )
    average_rank = np.cumsum(tie_counts) - (tie_counts - 1) / 2.0
    rank_sum = float(average_rank[tie_group][is_positive].sum())
    return (rank_sum - n_positive * (n_positive + 1) / 2.0) / (n_positive * n_negative)


def binary_log_loss(y_true: np.ndarray, score: np.ndarray) -> float:
    """Mean binary cross-entropy of P(positive) scores."""
    y_true = np.asarray(y_true, dtype=np.float64)
    p = np.clip(np.asarray(score, dtype=np.float64), PROBABILITY_EPS, 1.0 - PROBABILITY_EPS)
    return float(-np.mean(y_true * np.log(p) + (1.0 - y_true) * np.log(1.0 - p)))


def binary_metrics(y_true: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    """Every metric of :data:`BINARY_METRICS` at ``threshold`` (positive when score >= it)."""
    y_true = np.asarray(y_true).astype(int)
    score = np.asarray(score, dtype=np.float64)
    counts = confusion_counts(y_true, score >= threshold)
    return {
        **rates_from_counts(**counts),
        "auc": roc_auc(y_true, score),
        "log_loss": binary_log_loss(y_true, score),
    }


def _one_vs_rest(y_true: np.ndarray, proba: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class one-vs-rest figures with the argmax decision, as arrays over classes."""
    n_classes = proba.shape[1]
    y_pred = proba.argmax(axis=1)
    rows = {"support": [], "precision": [], "recall": [], "specificity": [], "f1": [], "auc": []}
    for index in range(n_classes):
        is_class = y_true == index
        rates = rates_from_counts(**confusion_counts(is_class, y_pred == index))
        rows["support"].append(int(is_class.sum()))
        rows["precision"].append(rates["precision"])
        rows["recall"].append(rates["sensitivity"])
        rows["specificity"].append(rates["specificity"])
        rows["f1"].append(rates["f1"])
        rows["auc"].append(roc_auc(is_class.astype(int), proba[:, index]))
    return {name: np.asarray(values) for name, values in rows.items()}


def per_class_table(
    y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str]
) -> pd.DataFrame:
    """One row per class, one-vs-rest with the argmax decision: support, precision,
    recall (sensitivity), specificity, F1 and AUC."""
    columns = _one_vs_rest(np.asarray(y_true, dtype=int), np.asarray(proba, dtype=np.float64))
    return pd.DataFrame({"class": list(classes), **columns})


def multiclass_metrics(
    y_true: np.ndarray, proba: np.ndarray, positive_index: int
) -> dict[str, float]:
    """Every metric of :data:`MULTICLASS_METRICS` with the argmax decision.

    Macro figures average the per-class one-vs-rest values over the classes present in
    ``y_true`` (``balanced_accuracy`` = macro recall, ``auc`` = macro one-vs-rest AUC),
    skipping undefined ones (precision of a class never predicted); ``sensitivity`` and
    ``specificity`` are those of the positive class against all the others.
    """
    y_true = np.asarray(y_true, dtype=int)
    proba = np.asarray(proba, dtype=np.float64)
    per_class = _one_vs_rest(y_true, proba)
    present = per_class["support"] > 0

    def macro(name: str) -> float:
        return _nanmean(per_class[name][present].tolist())

    clipped = np.clip(proba, PROBABILITY_EPS, 1.0)
    normalised = clipped / clipped.sum(axis=1, keepdims=True)
    return {
        "accuracy": float(np.mean(proba.argmax(axis=1) == y_true)),
        "balanced_accuracy": macro("recall"),
        "sensitivity": float(per_class["recall"][positive_index]),
        "specificity": float(per_class["specificity"][positive_index]),
        "macro_precision": macro("precision"),
        "macro_recall": macro("recall"),
        "macro_f1": macro("f1"),
        "macro_specificity": macro("specificity"),
        "auc": macro("auc"),
        "log_loss": float(-np.mean(np.log(normalised[np.arange(len(y_true)), y_true]))),
    }


@dataclass(frozen=True)
class ConfidenceInterval:
    low: float
    high: float
    resamples_used: int


def bootstrap_ci(
    metric_fn: Callable[[np.ndarray], Mapping[str, float]],
    n_items: int,
    *,
    samples: int,
    confidence: float,
    seed: int,
) -> dict[str, ConfidenceInterval]:
    """Seeded percentile bootstrap over items (images).

    ``metric_fn(indices)`` returns the metrics of the items at ``indices`` (a resample with
    replacement). Resamples where a metric is ``nan`` (undefined, e.g. one class only) are
    skipped for that metric; ``resamples_used`` says how many were left. A metric undefined
    in every resample gets a ``nan`` interval.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {}
    for _ in range(samples):
        indices = rng.integers(0, n_items, size=n_items)
        for name, value in metric_fn(indices).items():
            values.setdefault(name, []).append(value)
    tail = 100.0 * (1.0 - confidence) / 2.0
    intervals = {}
    for name, series in values.items():
        finite = np.asarray([v for v in series if not math.isnan(v)])
        if finite.size == 0:
            intervals[name] = ConfidenceInterval(math.nan, math.nan, 0)
            continue
        low, high = np.percentile(finite, [tail, 100.0 - tail])
        intervals[name] = ConfidenceInterval(float(low), float(high), int(finite.size))
    return intervals


def threshold_for_sensitivity(y_true: np.ndarray, score: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity is still >= ``target``.

    Missing mpox costs more than a false alarm, so sensitivity is the constraint; among
    the thresholds meeting it the highest keeps the most specificity.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"sensitivity target must be in (0, 1], got {target}")
    positives = np.sort(np.asarray(score, dtype=np.float64)[np.asarray(y_true).astype(bool)])
    if positives.size == 0:
        raise ValueError("no positive samples: a sensitivity target cannot be met")
    # Sensitivity at threshold = the k-th highest positive score is k / n_positives.
    needed = math.ceil(target * positives.size - 1e-9)
    return float(positives[::-1][needed - 1])


def youden_threshold(y_true: np.ndarray, score: np.ndarray) -> float:
    """The threshold maximising Youden's J = sensitivity + specificity - 1 (highest on ties)."""
    y_true = np.asarray(y_true).astype(int)
    if np.unique(y_true).size < 2:
        raise ValueError("Youden's J needs both classes in the labels")
    fpr, tpr, thresholds = roc_curve(y_true, score, drop_intermediate=False)
    finite = np.isfinite(thresholds)
    j = np.where(finite, tpr - fpr, -np.inf)
    return float(thresholds[int(np.argmax(j))])  # roc_curve lists thresholds descending


def choose_threshold(
    y_true: np.ndarray, score: np.ndarray, rule_cfg: Mapping[str, Any]
) -> float:
    """Apply ``evaluate.threshold`` (``rule``: sensitivity_target | fixed | youden)."""
    rule = rule_cfg["rule"]
    if rule == "sensitivity_target":
        return threshold_for_sensitivity(y_true, score, float(rule_cfg["sensitivity_target"]))
    if rule == "fixed":
        return float(rule_cfg["fixed"])
    if rule == "youden":
        return youden_threshold(y_true, score)
    raise ValueError(f"unknown threshold rule {rule!r}; choose one of {THRESHOLD_RULES}")


def roc_points(y_true: np.ndarray, score: np.ndarray) -> pd.DataFrame:
    """ROC curve as ``fpr, tpr, threshold`` rows (the first threshold is +inf: nothing called
    positive)."""
    fpr, tpr, thresholds = roc_curve(np.asarray(y_true).astype(int), score)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thresholds})


def pr_points(y_true: np.ndarray, score: np.ndarray) -> pd.DataFrame:
    """Precision-recall curve as ``recall, precision, threshold`` rows; the closing
    (recall 0, precision 1) point has no threshold (empty)."""
    precision, recall, thresholds = precision_recall_curve(np.asarray(y_true).astype(int), score)
    return pd.DataFrame(
        {"recall": recall, "precision": precision, "threshold": np.append(thresholds, np.nan)}
    )


# ---------------------------------------------------------------------------- calibration


def _bin_sums(
    confidence: np.ndarray, outcome: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin: sample count, sum of confidences, sum of outcomes."""
    confidence = np.asarray(confidence, dtype=np.float64)
    outcome = np.asarray(outcome, dtype=np.float64)
    index = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    return (
        np.bincount(index, minlength=n_bins),
        np.bincount(index, confidence, minlength=n_bins),
        np.bincount(index, outcome, minlength=n_bins),
    )


def reliability_bins(confidence: np.ndarray, outcome: np.ndarray, n_bins: int) -> pd.DataFrame:
    """Equal-width bins over [0, 1]: ``bin_low, bin_high, count, confidence, frequency``.

    ``confidence`` is a predicted probability and ``outcome`` 1 where the predicted event
    happened; bin ``b`` holds ``b/n <= confidence < (b+1)/n`` (the last bin includes 1).
    ``confidence`` and ``frequency`` are the bin's means (``nan`` for an empty bin).
    """
    count, confidence_sum, outcome_sum = _bin_sums(confidence, outcome, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = confidence_sum / count
        frequency = outcome_sum / count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return pd.DataFrame(
        {
            "bin_low": edges[:-1],
            "bin_high": edges[1:],
            "count": count,
            "confidence": mean_confidence,
            "frequency": frequency,
        }
    )


def expected_calibration_error(
    confidence: np.ndarray, outcome: np.ndarray, n_bins: int
) -> float:
    """ECE: the count-weighted mean of ``|frequency - confidence|`` over the equal-width bins
    of :func:`reliability_bins` (``nan`` without samples). Plain numpy: it runs in every
    bootstrap resample."""
    count, confidence_sum, outcome_sum = _bin_sums(confidence, outcome, n_bins)
    total = int(count.sum())
    # count * |mean outcome - mean confidence| = |outcome sum - confidence sum|
    return float(np.abs(outcome_sum - confidence_sum).sum() / total) if total else math.nan


def temperature_nll(
    labels: np.ndarray, outputs: np.ndarray, temperature: float, binary: bool
) -> float:
    """Mean negative log-likelihood of the labels under the temperature-scaled outputs.

    Binary: ``labels`` 0/1 and ``outputs`` P(positive); multi-class: class indices and
    softmax rows. Computed from the logits (log-sum-exp), so no probability is rounded to 0.
    """
    labels = np.asarray(labels, dtype=int)
    if binary:
        z = binary_logits(outputs) / temperature
        return float(np.mean(np.logaddexp(0.0, z) - labels * z))
    z = log_probabilities(outputs) / temperature
    return float(np.mean(-log_softmax(z, axis=1)[np.arange(len(labels)), labels]))


def fit_temperature(
    labels: np.ndarray, outputs: np.ndarray, bounds: Sequence[float], binary: bool
) -> float:
    """The T in ``bounds`` minimising :func:`temperature_nll` (Guo et al. 2017), by a bounded
    scalar search: one parameter, so it cannot change which images rank above which."""
    low, high = (float(b) for b in bounds)
    if not 0.0 < low < high:
        raise ValueError(f"temperature bounds must satisfy 0 < low < high, got {bounds}")
    result = minimize_scalar(
        lambda t: temperature_nll(labels, outputs, t, binary), bounds=(low, high), method="bounded"
    )
    return float(result.x)
