"""Decisions on all the evidence (issue 16): out-of-fold predictions over every non-test photo,
the refit, the operating points, the one-standard-error rule and the card that states them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import DictConfig

from pox_pipeline.common import paths
from pox_pipeline.data.prepare import group_folds, load_split, split_groups_of
from pox_pipeline.release import select
from pox_pipeline.serving import model_card
from pox_pipeline.serving.policy import DecisionPolicy
from pox_pipeline.training import evaluate, train
from pox_pipeline.training.tracking import OUT_OF_FOLD_PROTOCOL, read_run_info

FOLDS = 3


def test_refit_epochs_are_the_folds_median_and_drop_a_phase_the_folds_did_not_keep() -> None:
    folds = [
        [{"phase": "head", "phase_best_epoch": e, "kept": True},
         {"phase": "finetune", "phase_best_epoch": 4, "kept": kept}]
        for e, kept in ((3, True), (8, False), (5, False))
    ]  # fmt: skip
    assert train.refit_epochs(folds) == {"head": 5, "finetune": 0}
    folds[1][1]["kept"] = True
    assert train.refit_epochs(folds) == {"head": 5, "finetune": 4}


def test_group_folds_keep_each_patient_in_one_fold() -> None:
    groups = [f"p{i // 2}" for i in range(40)]
    labels = np.array([(i // 2) % 2 for i in range(40)])
    folds = group_folds(groups, labels, 4, seed=0)
    assert set(folds) == {0, 1, 2, 3}
    for patient in set(groups):
        assert len({folds[i] for i, g in enumerate(groups) if g == patient}) == 1


def test_out_of_fold_predictions_come_from_models_that_never_saw_the_photo(
    prepared_cfg: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every non-test photo gets one out-of-fold output, from the fold model whose training
    and early-stopping images exclude its patient; the served model is refitted on all."""
    cfg = prepared_cfg(f"train.refit.folds={FOLDS}", "model.colour_texture.epochs=2",
                       "model.colour_texture.input_size=null")  # fmt: skip
    fits: list[tuple[np.ndarray, np.ndarray | None, dict | None]] = []
    real_fit = train.fit_phases

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        fits.append((args[5], args[6], args[8] if len(args) > 8 else kwargs.get("epochs")))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(train, "fit_phases", recording)
    info = train.train(cfg, "colour_texture")

    oof = pd.read_csv(paths.oof_file(cfg, "colour_texture"))
    files = [*load_split(cfg, "train")[2], *load_split(cfg, "val")[2]]
    assert len(oof) == len(files) and oof["fold"].between(0, FOLDS - 1).all()
    groups = np.array([*split_groups_of(cfg, "train"), *split_groups_of(cfg, "val")])
    for group in set(groups):  # one patient, one fold
        assert oof.loc[groups == group, "fold"].nunique() == 1
    assert len(fits) == FOLDS + 1
    for fold, (fit_index, stop_index, epochs) in enumerate(fits[:FOLDS]):
        held_out = set(np.flatnonzero(oof["fold"].to_numpy() == fold))
        assert held_out and not held_out & set(fit_index) and not held_out & set(stop_index)
        assert epochs is None  # early-stopped
    refit_index, refit_stop, refit_epochs = fits[-1]
    assert sorted(refit_index) == list(range(len(files))) and refit_stop is None
    assert refit_epochs == info["cross_validation"]["refit_epochs"]
    assert info["protocol"] == OUT_OF_FOLD_PROTOCOL
    assert read_run_info(cfg, "colour_texture")["cross_validation"]["folds"] == FOLDS


def _fake_oof(cfg: DictConfig, name: str, scores: np.ndarray, labels: np.ndarray) -> None:
    """A trained model's out-of-fold file and protocol, as train writes them."""
    files = [*load_split(cfg, "train")[2], *load_split(cfg, "val")[2]]
    n = len(files)
    frame = pd.DataFrame({"file": [str(Path(f).relative_to(cfg.paths.prepared_dir))
                                   for f in files],
                          "label": labels[:n], "fold": np.arange(n) % FOLDS,
                          "output_0": scores[:n]})  # fmt: skip
    frame.to_csv(paths.oof_file(cfg, name), index=False)
    info = read_run_info(cfg, name)
    info["protocol"] = OUT_OF_FOLD_PROTOCOL
    paths.run_info_file(cfg, name).write_text(json.dumps(info))


def test_evaluate_sets_threshold_and_calibration_on_the_out_of_fold_evidence(
    prepared_cfg: Callable[..., DictConfig],
) -> None:
    from helpers.training import fake_trained_model

    cfg = prepared_cfg("evaluate.bootstrap.samples=50", "evaluate.calibration=none")
    fake_trained_model(cfg, "tiny")
    n = sum(len(load_split(cfg, s)[1]) for s in ("train", "val"))
    labels = np.arange(n) % 2  # 0 = Monkeypox, the positive class
    scores = np.where(labels == 0, np.linspace(0.4, 0.95, n), np.linspace(0.05, 0.6, n))
    _fake_oof(cfg, "tiny", scores, labels)
    result = evaluate.evaluate(cfg, "tiny")
    val = result["val"]
    assert val["evidence"] == evaluate.OUT_OF_FOLD and val["n_val"] == n
    positives = np.sort(scores[labels == 0])
    # the 90% rule on the out-of-fold scores: 90% of their positives at or above it
    assert np.mean(positives >= val["threshold"]) >= 0.9
    assert val["threshold"] == pytest.approx(np.quantile(positives, 0.1), abs=0.06)
    assert val["folds"] == FOLDS and val["auc_fold_se"] > 0
    names = [point["name"] for point in val["operating_points"]]
    assert names == list(cfg.evaluate.operating_points)
    fixed = next(p for p in val["operating_points"] if p["name"] == "fixed_0.5")
    assert fixed["threshold"] == 0.5
    expected = np.mean(scores[labels == 0] >= 0.5)
    assert fixed["sensitivity"] == pytest.approx(expected)
    assert fixed["sensitivity_ci_low"] <= fixed["sensitivity"] <= fixed["sensitivity_ci_high"]
    test_points = result["test"]["operating_points"]
    on_evidence = [p["threshold"] for p in val["operating_points"]]
    assert [p["threshold"] for p in test_points] == on_evidence


def _val(mean: float, se: float) -> dict:
    return {"auc": mean, "auc_fold_mean": mean, "auc_fold_se": se, "threshold": 0.5}


def test_one_standard_error_rule_marks_what_the_evidence_cannot_tell_apart() -> None:
    table = select.one_standard_error_rule(
        {"big": _val(0.87, 0.02), "small": _val(0.855, 0.05), "weak": _val(0.80, 0.01)},
        "auc", greater_is_better=True,
    )  # fmt: skip
    assert [name for name, row in table.items() if row["eligible"]] == ["big", "small"]
    fixed_split = select.one_standard_error_rule(
        {"a": {"auc": 0.7}, "b": {"auc": 0.71}}, "auc", True
    )
    assert [name for name, row in fixed_split.items() if row["eligible"]] == ["b"]


def test_the_cheapest_eligible_model_wins(
    make_cfg: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_cfg()
    for name in ("big", "small", "weak"):
        evaluated = paths.eval_dir(cfg, name)
        evaluated.mkdir(parents=True)
        (evaluated / paths.SELECTION_METRICS_FILE).write_text("{}")
    cost = {"big": 30e9, "small": 8e9, "weak": 1e9}
    counted: list[str] = []
    monkeypatch.setattr(select, "load_keras_model", lambda path: path.parent.name)
    monkeypatch.setattr(select, "flops_per_photo",
                        lambda model, *_: counted.append(model) or cost[model])  # fmt: skip
    table = {"big": {"eligible": True}, "small": {"eligible": True}, "weak": {"eligible": False}}
    assert select.cheapest(table, cfg) == "small"
    assert counted == ["big", "small"]  # the ineligible one is not even counted
    assert table["small"]["gflops"] == 8.0 and "gflops" not in table["weak"]


def test_flops_count_the_models_work_and_its_tta_views() -> None:
    """Deterministic, and a model that does more work per photo counts more."""
    import keras

    from pox_pipeline.models.inference import flops_per_photo

    def conv_net(filters: int) -> keras.Model:
        inputs = keras.Input((32, 32, 3))
        x = keras.layers.Conv2D(filters, 3)(inputs)
        outputs = keras.layers.Dense(1, name="output")(keras.layers.GlobalAveragePooling2D()(x))
        return keras.Model(inputs, outputs)

    small, big = conv_net(4), conv_net(16)
    assert flops_per_photo(small, 32, "none") == flops_per_photo(small, 32, "none") > 0
    assert flops_per_photo(big, 32, "none") > 3 * flops_per_photo(small, 32, "none")
    assert flops_per_photo(small, 32, "flips") == pytest.approx(
        4 * flops_per_photo(small, 32, "none"), rel=0.01
    )


METADATA = {
    "classes": ["Monkeypox", "Others"], "positive_class": "Monkeypox", "threshold": 0.2,
    "image_size": 32, "resample": "bilinear",
    "selection_metrics": {"evidence": "out_of_fold", "n_val": 182, "sensitivity": 0.9,
                          "sensitivity_ci_low": 0.84, "sensitivity_ci_high": 0.95,
                          "specificity": 0.6, "specificity_ci_low": 0.5,
                          "specificity_ci_high": 0.7},
}  # fmt: skip


def test_the_answer_states_the_promised_rates_with_their_intervals() -> None:
    card = DecisionPolicy.from_metadata("pox", "v1", METADATA)
    trade = card.threshold_trade()
    assert "182 out-of-fold predictions" in trade
    assert "90% (95% interval 84%-95%)" in trade and "40% (95% interval 30%-50%)" in trade
    (answer,) = card.results(np.array([[0.3]]))
    assert trade in answer["explanation"] and answer["label"] == "Monkeypox"


def test_a_model_published_with_the_old_val_metrics_key_still_states_its_evidence() -> None:
    old = {k: v for k, v in METADATA.items() if k != "selection_metrics"}
    old["val_metrics"] = METADATA["selection_metrics"]
    trade = DecisionPolicy.from_metadata("pox", "v1", old).threshold_trade()
    assert trade == DecisionPolicy.from_metadata("pox", "v1", METADATA).threshold_trade()
    assert "182 out-of-fold predictions" in trade
    assert "182 out-of-fold" in model_card.render("pox", old)


def test_a_site_threshold_override_changes_the_decision_and_says_so() -> None:
    card = DecisionPolicy.from_metadata("pox", "v1", METADATA)
    site = card.with_threshold_override(0.5)
    (answer,) = site.results(np.array([[0.3]]))
    assert answer["label"] == "Others" and answer["threshold"] == 0.5
    assert "serve.threshold_override" in answer["explanation"] and "20%" in answer["explanation"]
    assert card.with_threshold_override(None) is card
    with pytest.raises(ValueError, match="threshold_override"):
        card.with_threshold_override(1.5)
    text = model_card.render("pox", model_card.with_site_override(METADATA, 0.5))
    assert "serve.threshold_override" in text


def test_the_card_says_the_guards_rate_in_words() -> None:
    assert model_card.stated_rate_in_words(0.011).startswith("About 1 in 91 genuine")


@pytest.mark.parametrize("folds", [1, 2])
def test_too_few_refit_folds_are_refused_with_the_reason(
    prepared_cfg: Callable[..., DictConfig], folds: int
) -> None:
    """2 folds leave each fold's model nothing to train on (the other fold early-stops it):
    the old error was Keras's "Sample weights must contain at least one non-zero number"."""
    cfg = prepared_cfg(f"train.refit.folds={folds}")
    with pytest.raises(ValueError, match="at least 3"):
        train.train(cfg, "colour_texture")
