"""The evaluate stage: contract files with the expected keys and columns, the threshold
chosen on val, and the metrics logged to the model's MLflow run."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from omegaconf import DictConfig

from helpers.training import fake_trained_model
from pox_pipeline.common.temperature import class_probabilities
from pox_pipeline.training import evaluate as evaluate_module
from pox_pipeline.training.evaluate import evaluate
from pox_pipeline.training.metrics import BINARY_METRICS, MULTICLASS_METRICS, binary_metrics

FIGURES = {"confusion.png", "roc.png", "pr.png", "reliability_val.png", "reliability_test.png"}
PNG_MAGIC = b"\x89PNG"


def _read_outputs(cfg: DictConfig, name: str) -> tuple[dict, dict, pd.DataFrame]:
    out = Path(cfg.paths.reports_dir) / "eval" / name
    assert {p.name for p in (out / "figures").iterdir()} == FIGURES
    for figure in FIGURES:
        assert (out / "figures" / figure).read_bytes()[:4] == PNG_MAGIC
    val = json.loads((out / "selection_metrics.json").read_text())
    test = json.loads((out / "test_metrics.json").read_text())
    # DVC's metrics file: only the compared figures, the same numbers as the full reports
    compared = json.loads((out / "metrics.json").read_text())
    assert compared == {
        "val": {metric: val[metric] for metric in cfg.evaluate.compare.val},
        "test": {metric: test[metric] for metric in cfg.evaluate.compare.test},
    }
    assert len(compared["test"]) == len(cfg.evaluate.compare.test) < len(test) // 4
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns) == ["file", "actual", "predicted", "probability"]
    assert list(pd.read_csv(out / "roc.csv").columns) == ["fpr", "tpr", "threshold"]
    assert list(pd.read_csv(out / "pr.csv").columns) == ["recall", "precision", "threshold"]
    return val, test, predictions


def reference_ece(predictions: pd.DataFrame, positive: str, n_bins: int) -> float:
    """Binary ECE bin by bin: |frequency of the positive class - mean P(positive)| weighted by
    the bin's share of the images."""
    probability = predictions["probability"].to_numpy()
    positive_mask = (predictions["actual"] == positive).to_numpy()
    total = 0.0
    for b in range(n_bins):
        inside = (probability >= b / n_bins) & (
            (probability < (b + 1) / n_bins) if b < n_bins - 1 else (probability <= 1.0)
        )
        if inside.any():
            gap = positive_mask[inside].mean() - probability[inside].mean()
            total += inside.sum() * abs(gap)
    return total / len(probability)


def test_evaluate_binary_writes_the_contract_and_logs_to_the_run(
    prepared_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """On the output of the real `train` (one epoch of the CNN at 32 px, on the fixed split:
    tests/unit/training/test_refit.py evaluates on out-of-fold evidence)."""
    from pox_pipeline.training.train import train

    cfg = prepared_cfg(
        "train.refit.folds=0",
        "evaluate.bootstrap.samples=50",
        "model.cnn.epochs=1",
        "model.cnn.padding=same",  # 5 valid conv+pool blocks do not fit in 32 px
        "train.verbose=0",
    )
    train(cfg, "cnn")
    result = evaluate(cfg, "cnn")
    val, test, predictions = _read_outputs(cfg, "cnn")
    assert result == {"val": val, "test": test}

    # threshold chosen on val by the configured rule, applied unchanged to test
    assert val["threshold_rule"] == test["threshold_rule"] == "sensitivity_target"
    assert val["threshold"] == test["threshold"]
    assert val["sensitivity"] >= cfg.evaluate.threshold.sensitivity_target
    assert set(BINARY_METRICS) <= set(val)
    for name in BINARY_METRICS:
        assert {name, f"{name}_ci_low", f"{name}_ci_high"} <= set(test)
    assert test["n_test"] == len(predictions)
    # temperature fitted on val (the default), within its bounds, shared by both files
    assert val["calibration"] == test["calibration"] == "temperature"
    assert val["tta"] == test["tta"] == "none"
    low, high = cfg.evaluate.temperature_bounds
    assert low <= val["temperature"] == test["temperature"] <= high
    # the test ECE is that of the probabilities in predictions.csv, by an independent count
    assert test["ece"] == pytest.approx(
        reference_ece(predictions, cfg.data.positive_class, cfg.evaluate.ece_bins), abs=1e-6
    )
    if val["temperature"] != pytest.approx(1.0, abs=1e-3):  # T changed the probabilities
        assert val["ece"] != pytest.approx(val["ece_uncalibrated"], abs=1e-9)
    assert test["ece_ci_low"] <= test["ece"] <= test["ece_ci_high"]
    assert test["bootstrap_samples"] == 50
    assert 0 < test["bootstrap_min_resamples_used"] <= 50

    # predictions.csv is the decision at that threshold, and reproduces test_metrics.json
    classes = list(cfg.data.classes)
    positive = cfg.data.positive_class
    negative = next(c for c in classes if c != positive)
    called_positive = predictions["probability"] >= test["threshold"]
    expected = np.where(called_positive, positive, negative)
    assert predictions["predicted"].tolist() == expected.tolist()
    assert set(predictions["actual"]) <= set(classes)
    assert all((Path(cfg.paths.prepared_dir) / f).is_file() for f in predictions["file"])
    recomputed = binary_metrics(
        (predictions["actual"] == positive).to_numpy(),
        predictions["probability"].to_numpy(),
        test["threshold"],
    )
    assert recomputed["balanced_accuracy"] == pytest.approx(test["balanced_accuracy"])

    run_json = Path(cfg.paths.models_dir) / "cnn" / "run.json"
    run_id = json.loads(run_json.read_text())["mlflow_run_id"]
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.data.metrics["test_balanced_accuracy"] == pytest.approx(test["balanced_accuracy"])
    assert run.data.metrics["val_sensitivity"] == pytest.approx(val["sensitivity"])
    assert run.data.metrics["threshold"] == pytest.approx(test["threshold"])
    assert run.data.tags["threshold_rule"] == "sensitivity_target"
    assert run.data.metrics["temperature"] == pytest.approx(val["temperature"])
    assert run.data.metrics["test_ece"] == pytest.approx(test["ece"])
    assert run.data.tags["calibration"] == "temperature" and run.data.tags["tta"] == "none"
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, "eval/figures")}
    assert logged == FIGURES


def test_evaluate_multiclass_uses_argmax_and_writes_per_class(
    make_cfg: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    classes = ["Monkeypox", "Chickenpox", "Others"]
    cfg = make_cfg(
        f"data.classes=[{','.join(classes)}]",
        "data.image_size=8",
        "evaluate.bootstrap.samples=20",
    )
    rng = np.random.default_rng(0)

    def fake_split(_cfg: DictConfig, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        labels = np.tile(np.arange(3), 8)
        images = rng.uniform(0, 255, (len(labels), 8, 8, 3)).astype(np.float32)
        images[..., 0] += 60.0 * labels[:, None, None]  # make classes a bit separable
        files = [str(Path(cfg.paths.prepared_dir) / split / f"{i}.png") for i in range(len(labels))]
        return images, labels, files

    monkeypatch.setattr(evaluate_module, "load_split", fake_split)
    monkeypatch.setattr(evaluate_module, "split_collections_of", lambda _cfg, _split: [])
    fake_trained_model(cfg, "cnn", n_classes=3)
    evaluate(cfg, "cnn")
    val, test, predictions = _read_outputs(cfg, "cnn")

    assert val["threshold"] is None and val["threshold_rule"] == "argmax"
    assert val["temperature"] == test["temperature"] > 0
    assert {"ece", "ece_uncalibrated"} <= set(val) and {"ece_ci_low", "ece_ci_high"} <= set(test)
    assert "binary" in val["decision"]
    assert set(MULTICLASS_METRICS) <= set(val)
    assert {"macro_f1_ci_low", "auc_ci_high"} <= set(test)
    per_class = pd.read_csv(Path(cfg.paths.reports_dir) / "eval" / "cnn" / "per_class.csv")
    assert per_class["class"].tolist() == classes
    assert per_class["support"].tolist() == [8, 8, 8]
    assert set(predictions["predicted"]) <= set(classes)
    accuracy = (predictions["predicted"] == predictions["actual"]).mean()
    assert accuracy == pytest.approx(test["accuracy"])


def test_uncalibrated_evaluation_keeps_the_model_probabilities(
    make_cfg: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """calibration=none: T = 1 and the probabilities are the model's own."""
    cfg = make_cfg(
        "data.image_size=8", "evaluate.bootstrap.samples=10", "evaluate.calibration=none"
    )

    def fake_split(_cfg: DictConfig, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        rng = np.random.default_rng({"val": 0, "test": 1}[split])  # same images every call
        labels = np.tile(np.arange(2), 6)
        images = rng.uniform(0, 255, (len(labels), 8, 8, 3)).astype(np.float32)
        files = [str(Path(cfg.paths.prepared_dir) / split / f"{i}.png") for i in range(len(labels))]
        return images, labels, files

    monkeypatch.setattr(evaluate_module, "load_split", fake_split)
    monkeypatch.setattr(evaluate_module, "split_collections_of", lambda _cfg, _split: [])
    model = fake_trained_model(cfg, "cnn")
    evaluate(cfg, "cnn")
    images, _, _ = fake_split(cfg, "test")
    val, test, predictions = _read_outputs(cfg, "cnn")
    assert val["calibration"] == "none" and val["temperature"] == 1.0
    assert val["ece"] == val["ece_uncalibrated"] and test["ece"] == test["ece_uncalibrated"]
    np.testing.assert_allclose(
        predictions["probability"], model.predict_on_batch(images)[:, 0], rtol=1e-6
    )


def test_calibrated_tta_evaluation_is_what_the_service_computes(
    prepared_cfg: Callable[..., DictConfig],
) -> None:
    """Temperature and TTA from selection_metrics.json, as select ships them, make the serving
    Predictor reproduce predictions.csv: same probabilities, same decisions."""
    from helpers.models import tiny_model
    from pox_pipeline.data.prepare import load_split
    from pox_pipeline.serving.policy import DecisionPolicy
    from pox_pipeline.serving.predictor import Predictor

    cfg = prepared_cfg(
        "evaluate.bootstrap.samples=20",
        "evaluate.tta=flips",
        "evaluate.calibration=temperature",
        "evaluate.threshold.rule=youden",
    )
    fake_trained_model(cfg, "cnn")
    model_dir = Path(cfg.paths.models_dir) / "cnn"
    # a convolution: unlike the fake's mean colour, its output changes when the image flips
    tiny_model(int(cfg.data.image_size), seed=3).save(model_dir / "model.keras")
    evaluate(cfg, "cnn")
    val, test, predictions = _read_outputs(cfg, "cnn")
    assert val["tta"] == test["tta"] == "flips"

    classes = list(cfg.data.classes)
    positive = cfg.data.positive_class
    metadata = {
        "classes": classes, "positive_class": positive, "image_size": int(cfg.data.image_size),
        "resample": cfg.data.resample,
        **{k: val[k] for k in ("threshold", "temperature", "tta")},
    }
    card = DecisionPolicy.from_metadata("pox-classifier", "v1", metadata)
    predictor = Predictor(model_dir, card)
    images, _, _ = load_split(cfg, "test")
    results = predictor.predict(list(images))
    served = np.array([r["probabilities"][positive] for r in results])
    np.testing.assert_allclose(served, predictions["probability"], rtol=1e-4, atol=1e-6)
    clear = np.abs(served - val["threshold"]) > 1e-5  # float32 noise cannot flip these
    assert clear.sum() > len(served) // 2
    labels = np.array([r["label"] for r in results])
    assert (labels[clear] == predictions["predicted"].to_numpy()[clear]).all()

    # both halves mattered: without TTA or without T the service would answer differently
    plain = Predictor(model_dir, dataclasses.replace(card, tta="none"))
    plain_served = [r["probabilities"][positive] for r in plain.predict(list(images))]
    assert not np.allclose(plain_served, served, rtol=1e-4, atol=1e-6)
    if val["temperature"] != pytest.approx(1.0, abs=1e-3):
        uncalibrated = dataclasses.replace(card, temperature=1.0)
        raw = uncalibrated.results(predictor.outputs(images))
        assert not np.allclose([r["probabilities"][positive] for r in raw], served)


def test_split_scores_carry_every_class_probability() -> None:
    """A sigmoid becomes two columns in the classes' order, wherever the positive class sits;
    a softmax stays as it is; calibration and resampling keep both shapes."""
    sigmoid = np.array([[0.9], [0.2]])
    for positive_index in (0, 1):
        proba = class_probabilities(sigmoid, 1.0, positive_index)
        np.testing.assert_allclose(proba[:, positive_index], [0.9, 0.2])
        np.testing.assert_allclose(proba.sum(axis=1), 1.0)
        labels = np.array([positive_index, 1 - positive_index])
        scores = evaluate_module.SplitScores(["a", "b"], labels, proba, positive_index, binary=True)
        np.testing.assert_array_equal(scores.targets, [1, 0])
        np.testing.assert_array_equal(evaluate_module.predicted_indices(scores, 0.5),
                                      [positive_index, 1 - positive_index])  # fmt: skip
        softened = evaluate_module.calibrated(scores, 2.0)
        assert 0.5 < softened.positive_score[0] < 0.9 and 0.2 < softened.positive_score[1] < 0.5
        np.testing.assert_allclose(softened.proba.sum(axis=1), 1.0)
        np.testing.assert_array_equal(scores.subset(np.array([1, 1])).positive_score, [0.2, 0.2])
    softmax = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
    np.testing.assert_array_equal(class_probabilities(softmax, 1.0, 2), softmax)
    multi = evaluate_module.SplitScores([], np.array([1, 2]), softmax, 2, binary=False)
    np.testing.assert_array_equal(multi.targets, [1, 2])
    np.testing.assert_array_equal(multi.positive_score, [0.2, 0.2])
    np.testing.assert_array_equal(evaluate_module.predicted_indices(multi, None), [1, 0])


def test_each_collection_gets_its_own_test_figures(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg("evaluate.bootstrap.samples=50")
    prepared = Path(cfg.paths.prepared_dir)
    prepared.mkdir(parents=True)
    rng = np.random.default_rng(0)
    collections = ["a"] * 30 + ["b"] * 20
    labels = np.array([0, 1] * 25)
    # a is ranked well, b at random: the pooled figure hides b
    proba = np.where(np.arange(50) < 30, 0.8 * labels + 0.1, rng.uniform(size=50))
    rows = ["file,source,collection,class,group,split,sha256"] + [
        f"test/{i}.png,/raw/{i}.png,{c},Monkeypox,g{i},test,0" for i, c in enumerate(collections)
    ]
    (prepared / "manifest.csv").write_text("\n".join(rows) + "\n")
    scores = evaluate_module.SplitScores(
        [], labels, np.stack([1 - proba, proba], axis=1), 1, binary=True
    )
    found = evaluate_module.by_collection(cfg, scores, 0.5)["by_collection"]
    assert list(found) == ["a", "b"]
    assert found["a"]["n_test"] == 30 and found["b"]["n_test"] == 20
    assert found["a"]["auc"] == 1.0 and found["b"]["auc"] < 0.8
    expected = evaluate_module.with_ci(scores.subset(np.arange(30, 50)), 0.5, cfg)
    assert found["b"]["auc"] == expected["auc"]
    assert found["b"]["auc_ci_low"] == expected["auc_ci_low"]
    one = [r.replace(",b,", ",a,") for r in rows]
    (prepared / "manifest.csv").write_text("\n".join(one) + "\n")
    assert evaluate_module.by_collection(cfg, scores, 0.5) == {}
