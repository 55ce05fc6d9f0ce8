"""Metric values, bootstrap intervals and threshold rules on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import (
    balanced_accuracy_score,
    f1_score,
    log_loss,
    precision_score,
    roc_auc_score,
)

from pox_pipeline.common.temperature import temperature_scale
from pox_pipeline.training import metrics

# 4 positives then 6 negatives; at threshold 0.5: TP=3 FN=1 FP=2 TN=4.
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
S = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.55, 0.3, 0.1, 0.05, 0.4])


def test_confusion_counts_and_rates_by_hand() -> None:
    assert metrics.confusion_counts(Y, S >= 0.5) == {"tp": 3, "fp": 2, "tn": 4, "fn": 1}
    m = metrics.binary_metrics(Y, S, 0.5)
    assert set(m) == set(metrics.BINARY_METRICS)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(6 / 9)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    # positives beat 6, 6, 6 and 2 of the 6 negatives: 20 of 24 pairs
    assert m["auc"] == pytest.approx(20 / 24)
    assert m["log_loss"] == pytest.approx(log_loss(Y, S))


def test_auc_and_log_loss_tiny_case() -> None:
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert metrics.binary_log_loss([1, 0], [0.8, 0.4]) == pytest.approx(
        -(math.log(0.8) + math.log(0.6)) / 2
    )


def test_auc_equals_sklearn_with_ties() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        y = np.r_[0, 1, rng.integers(0, 2, 30)]
        s = rng.integers(0, 5, y.size) / 4  # few distinct scores: many ties
        assert metrics.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_undefined_metrics_are_nan() -> None:
    m = metrics.binary_metrics(np.zeros(4), np.array([0.1, 0.2, 0.3, 0.4]), 0.5)
    assert math.isnan(m["sensitivity"]) and math.isnan(m["auc"])
    assert math.isnan(m["precision"])  # nothing called positive
    assert math.isnan(m["balanced_accuracy"])
    assert m["specificity"] == 1.0


def test_confusion_matrix_counts() -> None:
    matrix = metrics.confusion_matrix([0, 0, 1, 2, 2], [0, 1, 1, 2, 0], 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_threshold_rules_by_hand() -> None:
    # positives score 0.9, 0.8, 0.7, 0.2: sensitivity 3/4 needs threshold <= 0.7
    assert metrics.threshold_for_sensitivity(Y, S, 0.75) == pytest.approx(0.7)
    assert metrics.threshold_for_sensitivity(Y, S, 0.95) == pytest.approx(0.2)
    assert metrics.threshold_for_sensitivity(Y, S, 0.5) == pytest.approx(0.8)
    # it is the highest such threshold: just above it sensitivity drops below the target
    assert metrics.binary_metrics(Y, S, 0.7)["sensitivity"] >= 0.75
    assert metrics.binary_metrics(Y, S, 0.7 + 1e-6)["sensitivity"] < 0.75
    # Youden: at 0.7 TPR 3/4, FPR 0 -> J = 0.75, the best
    assert metrics.youden_threshold(Y, S) == pytest.approx(0.7)
    rules = {"rule": "fixed", "fixed": 0.5, "sensitivity_target": 0.95}
    assert metrics.choose_threshold(Y, S, rules) == 0.5
    assert metrics.choose_threshold(Y, S, {**rules, "rule": "sensitivity_target"}) == 0.2
    assert metrics.choose_threshold(Y, S, {**rules, "rule": "youden"}) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="unknown threshold rule"):
        metrics.choose_threshold(Y, S, {**rules, "rule": "coin"})
    with pytest.raises(ValueError, match="no positive"):
        metrics.threshold_for_sensitivity(np.zeros(3), np.ones(3), 0.9)


def test_multiclass_macro_figures_match_sklearn() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    proba = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.3, 0.6, 0.1],
            [0.1, 0.8, 0.1],
            [0.2, 0.5, 0.3],
            [0.1, 0.2, 0.7],
            [0.5, 0.1, 0.4],
        ]
    )
    pred = proba.argmax(axis=1)  # [0, 1, 1, 1, 2, 0]
    m = metrics.multiclass_metrics(y, proba, positive_index=0)
    assert set(m) == set(metrics.MULTICLASS_METRICS)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["macro_precision"] == pytest.approx(precision_score(y, pred, average="macro"))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["auc"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr"))
    assert m["log_loss"] == pytest.approx(log_loss(y, proba))
    assert m["sensitivity"] == pytest.approx(1 / 2)  # class 0 recall
    assert m["specificity"] == pytest.approx(3 / 4)  # one of four non-0 called 0
    table = metrics.per_class_table(y, proba, ["a", "b", "c"])
    assert table["class"].tolist() == ["a", "b", "c"]
    assert table["support"].tolist() == [2, 2, 2]
    assert table["recall"].tolist() == pytest.approx([0.5, 1.0, 0.5])


def _binary_fn(y: np.ndarray, s: np.ndarray, threshold: float):
    return lambda idx: metrics.binary_metrics(y[idx], s[idx], threshold)


def test_bootstrap_is_seeded_and_contains_the_point_estimate() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    s = np.clip(0.3 * y + rng.uniform(0, 0.7, 80), 0, 1)
    fn = _binary_fn(y, s, 0.5)
    kwargs = {"samples": 200, "confidence": 0.95}
    first = metrics.bootstrap_ci(fn, len(y), seed=1, **kwargs)
    assert first == metrics.bootstrap_ci(fn, len(y), seed=1, **kwargs)
    assert first != metrics.bootstrap_ci(fn, len(y), seed=2, **kwargs)
    point = metrics.binary_metrics(y, s, 0.5)
    for name in metrics.BINARY_METRICS:
        ci = first[name]
        assert ci.low <= point[name] <= ci.high, name
        assert ci.low < ci.high
        assert ci.resamples_used == 200
    narrower = metrics.bootstrap_ci(fn, len(y), seed=1, samples=200, confidence=0.5)
    assert narrower["auc"].high - narrower["auc"].low < first["auc"].high - first["auc"].low


def test_bootstrap_skips_resamples_where_a_metric_is_undefined() -> None:
    y = np.array([1, 0, 0, 0, 0, 0])  # one positive: many resamples have none
    s = np.array([0.9, 0.1, 0.2, 0.6, 0.3, 0.4])
    ci = metrics.bootstrap_ci(_binary_fn(y, s, 0.5), len(y), samples=100, confidence=0.9, seed=0)
    assert 0 < ci["sensitivity"].resamples_used < 100
    assert ci["auc"].resamples_used == ci["sensitivity"].resamples_used
    assert ci["accuracy"].resamples_used == 100
    assert not math.isnan(ci["sensitivity"].low)


def test_curves_have_the_contract_columns() -> None:
    roc = metrics.roc_points(Y, S)
    assert list(roc.columns) == ["fpr", "tpr", "threshold"]
    assert roc["fpr"].iloc[-1] == 1.0 and roc["tpr"].iloc[-1] == 1.0
    pr = metrics.pr_points(Y, S)
    assert list(pr.columns) == ["recall", "precision", "threshold"]
    assert pr["recall"].max() == 1.0


# ---------------------------------------------------------------------------- calibration


def test_ece_and_reliability_bins_by_hand() -> None:
    # 4 bins of width 0.25. Bin 0: 0.1, 0.2 (outcomes 0, 1); bin 2: 0.6 (1);
    # bin 3: 0.8, 0.9, 1.0 (1, 1, 0). Bin 1 is empty.
    confidence = np.array([0.1, 0.2, 0.6, 0.8, 0.9, 1.0])
    outcome = np.array([0, 1, 1, 1, 1, 0])
    bins = metrics.reliability_bins(confidence, outcome, n_bins=4)
    assert bins["count"].tolist() == [2, 0, 1, 3]
    assert bins["bin_low"].tolist() == [0.0, 0.25, 0.5, 0.75]
    assert bins["confidence"][[0, 2, 3]].tolist() == pytest.approx([0.15, 0.6, 0.9])
    assert bins["frequency"][[0, 2, 3]].tolist() == pytest.approx([0.5, 1.0, 2 / 3])
    assert math.isnan(bins["confidence"][1]) and math.isnan(bins["frequency"][1])
    # gaps 0.35, 0.4, 0.9 - 2/3 weighted 2, 1, 3 out of 6
    expected = (2 * 0.35 + 1 * 0.4 + 3 * (0.9 - 2 / 3)) / 6
    assert metrics.expected_calibration_error(confidence, outcome, 4) == pytest.approx(expected)
    # one bin: |mean confidence - mean outcome|
    assert metrics.expected_calibration_error(confidence, outcome, 1) == pytest.approx(
        abs(confidence.mean() - outcome.mean())
    )
    perfect = metrics.expected_calibration_error([0.0, 0.0, 1.0], [0, 0, 1], 10)
    assert perfect == 0.0
    assert math.isnan(metrics.expected_calibration_error([], [], 10))


def test_temperature_scale_is_monotone_and_identity_at_one() -> None:
    p = np.array([0.3, 0.5, 0.9])
    np.testing.assert_array_equal(temperature_scale(p, 1.0, binary=True), p)
    softer = temperature_scale(p, 2.0, binary=True)
    # sigmoid(logit(0.9) / 2) = sqrt(9) / (1 + sqrt(9)) = 0.75
    assert softer.tolist() == pytest.approx([math.sqrt(3 / 7) / (1 + math.sqrt(3 / 7)), 0.5, 0.75])
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    sharper = temperature_scale(proba, 0.5, binary=False)
    # softmax(log p / 0.5) = p^2 / sum(p^2)
    assert sharper[0].tolist() == pytest.approx([0.49 / 0.54, 0.04 / 0.54, 0.01 / 0.54])
    assert (sharper.argmax(axis=1) == proba.argmax(axis=1)).all()
    np.testing.assert_allclose(sharper.sum(axis=1), 1.0)


@pytest.mark.parametrize("true_temperature", [0.5, 2.5])
def test_fit_temperature_recovers_a_known_temperature(true_temperature: float) -> None:
    """Labels drawn from softmax(z / T*): the model's outputs softmax(z) are miscalibrated
    by exactly T*, which the NLL fit must find."""
    rng = np.random.default_rng(0)
    n = 20_000
    bounds = [0.1, 10.0]
    logits = rng.normal(0.0, 3.0, (n, 3))
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    true = np.exp(logits / true_temperature)
    true /= true.sum(axis=1, keepdims=True)
    labels = (rng.uniform(size=(n, 1)) > true.cumsum(axis=1)).sum(axis=1)
    fitted = metrics.fit_temperature(labels, proba, bounds, binary=False)
    assert fitted == pytest.approx(true_temperature, rel=0.05)

    z = rng.normal(0.0, 3.0, n)
    score = 1 / (1 + np.exp(-z))
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-z / true_temperature))).astype(int)
    fitted = metrics.fit_temperature(y, score, bounds, binary=True)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    # calibrating lowers the NLL and the ECE
    calibrated = temperature_scale(score, fitted, binary=True)
    fitted_nll = metrics.temperature_nll(y, score, fitted, True)
    assert fitted_nll < metrics.temperature_nll(y, score, 1.0, True)
    assert metrics.binary_log_loss(y, calibrated) == pytest.approx(
        metrics.temperature_nll(y, score, fitted, True), rel=1e-6
    )
    assert metrics.expected_calibration_error(calibrated, y, 15) < (
        metrics.expected_calibration_error(score, y, 15)
    )
    with pytest.raises(ValueError, match="bounds"):
        metrics.fit_temperature(y, score, [0.0, 1.0], binary=True)
