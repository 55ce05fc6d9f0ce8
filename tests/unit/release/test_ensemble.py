"""Fold-model ensemble for serving: calibration baked into the weights, the mean of the
members' probabilities, chosen on validation only, registered and served as the champion."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest
from mlflow import MlflowClient
from omegaconf import DictConfig

from helpers.suite import TEST_IMAGE_SIZE
from pox_pipeline.common.temperature import temperature_scale
from pox_pipeline.data.prepare import load_split
from pox_pipeline.data.synthetic import synthesize
from pox_pipeline.release.ensemble import Member, bake_temperature, choose_families, make_ensemble
from pox_pipeline.serving.predictor import Predictor
from pox_pipeline.training.cv import cross_validate


def _head_model(units: int, activation: str) -> keras.Model:
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(units, activation=activation)(hidden))


@pytest.mark.parametrize(("units", "activation"), [(1, "sigmoid"), (3, "softmax")])
def test_baked_temperature_equals_temperature_scaling(units: int, activation: str) -> None:
    keras.utils.set_random_seed(0)
    model = _head_model(units, activation)
    inputs = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32) * 3
    raw = np.asarray(model(inputs))
    baked = np.asarray(bake_temperature(model, 2.5)(inputs))
    expected = temperature_scale(raw if units > 1 else raw[:, 0], 2.5, binary=units == 1)
    np.testing.assert_allclose(baked if units > 1 else baked[:, 0], expected, atol=1e-5)
    assert not np.allclose(baked, raw, atol=1e-3)  # the temperature did something


def test_temperature_is_baked_into_the_head_of_a_chained_model(make_cfg) -> None:
    from pox_pipeline.models.architectures import build_model

    cfg = make_cfg("model.colour_texture.input_size=null")
    model = build_model(cfg.model.colour_texture, cfg.data)  # frozen -> trainable chain
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    raw = np.asarray(model(images))[:, 0]
    baked = np.asarray(bake_temperature(model, 0.5)(images))[:, 0]
    np.testing.assert_allclose(baked, temperature_scale(raw, 0.5, binary=True), atol=1e-5)


def test_baking_needs_a_dense_probability_head() -> None:
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))  # linear: no probability
    with pytest.raises(ValueError, match="Dense"):
        bake_temperature(model, 2.0)


def _member(fold: int, auc: float) -> Member:
    return Member(seed=42, fold=fold, model_file=Path("unused"),
                  selection_metrics={"auc": auc}, test_metrics={},
                  run_info={})  # fmt: skip


def test_family_is_chosen_on_mean_validation_metric(make_cfg: Callable[..., DictConfig]) -> None:
    candidates = {
        "cnn": [_member(0, 0.9), _member(1, 0.5)],  # best single fold, worse mean (0.70)
        "resnet": [_member(0, 0.75), _member(1, 0.75)],
    }
    assert choose_families(make_cfg(), candidates) == ["resnet"]
    assert choose_families(make_cfg("ensemble.model=cnn"), candidates) == ["cnn"]
    assert choose_families(make_cfg("ensemble.model=[cnn,resnet]"), candidates) == ["cnn", "resnet"]
    with pytest.raises(ValueError, match="names of cv.models"):
        choose_families(make_cfg("ensemble.model=vgg16"), candidates)
    with pytest.raises(ValueError, match="names of cv.models"):
        choose_families(make_cfg("ensemble.model=[cnn,vgg16]"), candidates)


def test_missing_cv_run_is_a_clear_error(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = make_cfg("cv.models=[cnn]", f"cv.out_dir={tmp_path}/nothing-here")
    with pytest.raises(FileNotFoundError, match="run `python -m pox_pipeline.training.cv`"):
        make_ensemble(cfg)


def test_fold_ensemble_is_the_served_champion(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    import bentoml

    cfg = make_cfg(
        "cv.folds=2", "cv.models=[cnn]", "model.cnn.epochs=2", "model.cnn.padding=same",
        "evaluate.bootstrap.samples=20", f"cv.out_dir={tmp_path}/cv",
        f"cv.work_dir={tmp_path}/cv-work",
        f"select.bentoml_model_name=pox-ens-{uuid.uuid4().hex[:8]}",
    )  # fmt: skip
    synthesize(cfg)
    cross_validate(cfg)
    report = make_ensemble(cfg)

    assert report["model_name"] == "cnn-ensemble" and len(report["members"]) == 2
    member_thresholds = [m["threshold"] for m in report["members"]]
    assert report["threshold"] == pytest.approx(np.mean(member_thresholds))
    assert "balanced_accuracy_mean" in report["cv_test_metrics"]

    # The ensemble's output is the mean of each member's temperature-scaled probability.
    from pox_pipeline.training.cv import fold_config

    images, _, _ = load_split(fold_config(cfg, 0, 42), "test")
    ensemble = keras.saving.load_model(report["model_file"], compile=False)
    expected = np.mean(
        [
            temperature_scale(
                np.asarray(keras.saving.load_model(m["model_file"], compile=False)(images))[:, 0],
                m["temperature"],
                binary=True,
            )
            for m in report["members"]
        ],
        axis=0,
    )
    np.testing.assert_allclose(np.asarray(ensemble(images))[:, 0], expected, atol=1e-5)

    # Registered as the champion, and what the service loads and answers with.
    champion = MlflowClient().get_model_version_by_alias(
        cfg.select.registered_model_name, cfg.select.alias
    )
    assert champion.run_id == report["mlflow_run_id"]
    assert champion.tags["model_name"] == "cnn-ensemble"
    stored = bentoml.models.get(report["bentoml_tag"])
    assert stored.info.metadata["model_name"] == "cnn-ensemble"
    assert stored.info.metadata["temperature"] == 1.0  # in the weights, not applied twice
    assert "test_metrics" not in stored.info.metadata  # no held-out test for an ensemble
    # its guard: one head guard per member, each limit set on that member's own test fold
    spaces = stored.info.metadata["ood"]["spaces"]
    assert set(spaces) == {"head/member_0", "head/member_1", "image_statistics"}
    for fold in (0, 1):
        held_out = spaces[f"head/member_{fold}"]
        assert held_out["calibration_source"] == f"seed 42 fold {fold}'s test photos"
        test_photos = load_split(fold_config(cfg, fold, 42), "test")[0]
        assert held_out["calibration_photos"] == len(test_photos)
    # the labels at the ensemble's threshold (the guard's verdicts are the guard tests' concern)
    predictor = Predictor.from_stored(stored, ood_enabled=False)
    results = predictor.predict(list(images[:3]))
    assert [r["label"] for r in results] == [
        "Monkeypox" if p >= report["threshold"] else "Others" for p in expected[:3]
    ]


def test_fixed_folds_give_a_held_out_figure_for_seed_ensembles(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    from pox_pipeline.training.cv import fold_config
    from pox_pipeline.training.metrics import roc_auc

    cfg = make_cfg(
        "cv.folds=2", "cv.seeds=[1,2]", "cv.resplit=false", "cv.models=[cnn]",
        "model.cnn.epochs=1", "model.cnn.padding=same", "evaluate.bootstrap.samples=20",
        f"cv.out_dir={tmp_path}/cv", f"cv.work_dir={tmp_path}/cv-work", "ensemble.publish=false",
    )  # fmt: skip
    synthesize(cfg)
    cross_validate(cfg)
    report = make_ensemble(cfg)

    held_out = report["held_out_ensemble_metrics"]
    assert [(f["fold"], f["members"]) for f in held_out["folds"]] == [(0, 2), (1, 2)]
    # Fixed folds: both seeds' fold 0 hold the same test images, which no member trained on.
    (images, labels, files), (_, _, files_2) = (
        load_split(fold_config(cfg, 0, seed), "test") for seed in (1, 2)
    )
    assert [Path(f).name for f in files] == [Path(f).name for f in files_2]
    fold0 = [m for m in report["members"] if "fold0" in m["model_file"]]
    expected = np.mean(
        [
            temperature_scale(
                np.asarray(keras.saving.load_model(m["model_file"], compile=False)(images))[:, 0],
                m["temperature"],
                binary=True,
            )
            for m in fold0
        ],
        axis=0,
    )
    positive_index = list(cfg.data.classes).index(cfg.data.positive_class)
    positive = (np.asarray(labels) == positive_index).astype(int)
    assert held_out["folds"][0]["auc"] == pytest.approx(roc_auc(positive, expected), abs=1e-6)
    assert "registered_model_version" not in report  # ensemble.publish=false


def test_two_families_on_the_same_folds_give_a_held_out_figure(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = make_cfg(
        "cv.folds=2", "cv.models=[cnn,colour_texture]", "ensemble.model=[cnn,colour_texture]",
        "model.cnn.epochs=1", "model.cnn.padding=same", "model.colour_texture.epochs=2",
        "model.colour_texture.input_size=null", "evaluate.bootstrap.samples=20",
        f"cv.out_dir={tmp_path}/cv", f"cv.work_dir={tmp_path}/cv-work", "ensemble.publish=false",
    )  # fmt: skip
    synthesize(cfg)
    cross_validate(cfg)
    report = make_ensemble(cfg)

    assert report["model_name"] == "cnn-colour_texture-ensemble"
    assert report["architecture"] == "mean of 4 cnn + colour_texture"
    held_out = report["held_out_ensemble_metrics"]  # one seed: both families saw the same folds
    assert [(f["fold"], f["members"]) for f in held_out["folds"]] == [(0, 2), (1, 2)]
    for metric in cfg.cv.metrics:  # the summary is the mean of the folds' ensembles
        values = [f[metric] for f in held_out["folds"] if f[metric] is not None]
        assert held_out[f"{metric}_mean"] == pytest.approx(np.mean(values))


def test_no_held_out_figure_when_seeds_redraw_the_folds(
    make_cfg: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two seeds per fold: an ensemble per fold on fixed folds, none when each seed re-draws
    them (its members' test images differ). Scoring is stubbed: only the decision is tested."""
    from pox_pipeline.release import ensemble
    from pox_pipeline.release.ensemble import held_out_ensembles
    from pox_pipeline.training import evaluate

    members = [
        Member(seed=seed, fold=fold, model_file=Path("unused"),
               selection_metrics={"threshold": 0.5}, test_metrics={}, run_info={})  # fmt: skip
        for seed in (1, 2) for fold in (0, 1)
    ]
    scored: list[int] = []
    metrics = dict.fromkeys(make_cfg().cv.metrics, 0.5)
    monkeypatch.setattr(ensemble, "build_ensemble", lambda fold_models, *_: fold_models)
    monkeypatch.setattr(
        evaluate, "score_split",
        lambda _cfg, model, _split: scored.append(len(model)) or SimpleNamespace(labels=[0, 1]),
    )  # fmt: skip
    monkeypatch.setattr(evaluate, "split_metrics", lambda *_: metrics)
    models = [object() for _ in members]

    redrawn = make_cfg("cv.folds=2", "cv.seeds=[1,2]", "cv.resplit=true")
    assert held_out_ensembles(redrawn, members, models, "x") is None
    assert scored == []
    fixed = make_cfg("cv.folds=2", "cv.seeds=[1,2]", "cv.resplit=false")
    held_out = held_out_ensembles(fixed, members, models, "x")
    assert [(f["fold"], f["members"]) for f in held_out["folds"]] == [(0, 2), (1, 2)]
    assert scored == [2, 2]  # each fold's two seed models, scored together


def test_each_members_guard_limit_comes_from_photos_it_never_trained_on(tmp_path: Path) -> None:
    """A two-fold ensemble: member 0 trained on photos A, member 1 on photos B, each holding
    out the other's. With k = 1 a photo's distance to a reference holding it is 0, so a limit
    set on photos the member trained on (member 1 measured on B, as when every member took
    member 0's held-out photos) would be 0; each member's limit is the conformal rank of its
    own held-out photos' distances to its own training photos, in its own head columns."""
    from helpers.models import tiny_model
    from helpers.serve import skin_like_photos, tiny_guard_settings
    from pox_pipeline.guard import ood
    from pox_pipeline.models import forward
    from pox_pipeline.release.ensemble import build_ensemble
    from pox_pipeline.release.publish import GuardPhotos, MemberPhotos
    from pox_pipeline.serving import model_card

    ensemble = build_ensemble([tiny_model(seed=0), tiny_model(seed=1)], TEST_IMAGE_SIZE, "ens")
    a, b = skin_like_photos(12, seed=1), skin_like_photos(12, seed=2)
    settings = tiny_guard_settings(k=1, alpha=0.3)
    members = (MemberPhotos(a, b, "fold 0's test photos"),
               MemberPhotos(b, a, "fold 1's test photos"))  # fmt: skip
    guard, _ = GuardPhotos(a, np.zeros(len(a)), members=members).fit(ensemble, settings, "none")

    assert list(guard.guards) == ["head/member_0", "head/member_1", "image_statistics"]
    heads = ood.features_of(ensemble, np.concatenate([a, b]), settings, "none")[forward.HEAD]
    alpha = 0.3 / 3  # shared over the three guards
    for index, (trained_on, held_out) in enumerate([(slice(0, 12), slice(12, 24)),
                                                     (slice(12, 24), slice(0, 12))]):  # fmt: skip
        member = guard.guards[f"head/member_{index}"]
        own = slice(*member.columns)
        expected = ood.Guard.fit(heads[trained_on, own], heads[held_out, own], 1, alpha)
        assert member.columns == (4 * index, 4 * index + 4)  # each tiny member reads 4 features
        assert member.threshold == pytest.approx(expected.threshold, rel=1e-5)
        assert member.threshold > 1e-3  # never measured against a reference holding the photo
        assert member.calibration_source == f"fold {index}'s test photos"
        assert member.reference.shape[0] == 12 and member.calibration_photos == 12
    # served as stored: an upload's score is its worst ratio over the members and the statistics
    loaded = ood.GuardSet.load(guard.save(tmp_path / ood.OOD_FILE))
    probe = ood.features_of(ensemble, skin_like_photos(3, seed=3), settings, "none")
    ratios = [g.distances(probe[ood.space_of(key)][:, slice(*(g.columns or (0, None)))])
              / g.threshold for key, g in guard.guards.items()]  # fmt: skip
    np.testing.assert_allclose(loaded.scores(probe), np.max(ratios, axis=0), rtol=1e-5)
    assert loaded.metadata() == guard.metadata()
    # and the card says which photos set each member's limit
    rule = model_card.ood_rule({"ood": guard.metadata()})
    assert "(ensemble member_1)" in rule and "(fold 1's test photos)" in rule
