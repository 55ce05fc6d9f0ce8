"""The out-of-distribution guard: the distance rule, the features it reads in every model
family, and its verdict in the service's answers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig

from helpers.models import tiny_model
from helpers.serve import save_champion, skin_like_photos, tiny_guard_settings
from pox_pipeline.guard import ood
from pox_pipeline.models import forward
from pox_pipeline.models.architectures import FACTORIES, build_model
from pox_pipeline.serving.policy import verdict
from pox_pipeline.serving.predictor import Predictor

rng = np.random.default_rng(0)


def test_guard_flags_points_far_from_the_training_cloud() -> None:
    train = rng.normal(0, 1, (200, 8))
    val = rng.normal(0, 1, (50, 8))
    guard = ood.Guard.fit(train, val, k=5, alpha=0.1)
    near, far = guard.distances(np.vstack([np.zeros(8), np.full(8, 6.0)]))
    assert near < guard.threshold < far


def test_conformal_rank_and_the_rate_it_can_state(caplog: pytest.LogCaptureFixture) -> None:
    assert ood.conformal_rank(999, 0.01) == (990, pytest.approx(0.01))
    assert ood.conformal_rank(50, 0.1) == (46, pytest.approx(1 - 46 / 51))
    with caplog.at_level("WARNING"):
        rank, effective = ood.conformal_rank(182, 0.005)  # too few photos for 1 in 200
    assert (rank, effective) == (182, pytest.approx(1 / 183)) and "cannot bound" in caplog.text


def test_the_stated_rate_holds_on_genuine_photos_the_guard_never_saw() -> None:
    """Probe with fresh draws of the training distribution, never the reference or the
    calibration photos: the share flagged is the effective alpha the guard states."""
    train, calibration = rng.normal(0, 1, (300, 8)), rng.normal(0, 1, (400, 8))
    guard = ood.Guard.fit(train, calibration, k=5, alpha=0.1)
    fresh = rng.normal(0, 1, (4000, 8))
    flagged = np.mean(guard.distances(fresh) > guard.threshold)
    assert guard.effective_alpha == pytest.approx(0.1, abs=0.005)
    assert flagged == pytest.approx(guard.effective_alpha, abs=0.025)


def test_out_of_fold_distances_exclude_each_photos_own_patient() -> None:
    """Two near-identical photos per patient, a patient's photos in one fold: measured against a
    reference holding its twin, a photo looks close to everything, and a guard fitted that way
    refuses most genuine photos; out of fold, fresh photos are refused at most at the stated
    rate."""
    patients = rng.normal(0, 1, (150, 8))
    photos = np.repeat(patients, 2, axis=0) + rng.normal(0, 0.01, (300, 8))
    folds = np.repeat(np.arange(150) % 5, 2)
    guard = ood.Guard.fit_out_of_fold(photos, folds, k=1, alpha=0.1)
    in_sample = ood.Guard.of_reference(photos, k=1).with_threshold(
        ood.Guard.of_reference(photos, k=1).distances(photos), alpha=0.1
    )
    fresh = rng.normal(0, 1, (4000, 8))
    # conservative (each fold's reference is 4/5 of the photos the served one holds), never over
    assert 0.02 < np.mean(guard.distances(fresh) > guard.threshold) <= guard.effective_alpha + 0.02
    assert np.mean(in_sample.distances(fresh) > in_sample.threshold) > 0.9
    assert guard.calibration_photos == 300 and guard.reference.shape[0] == 300


def test_a_unit_silent_in_training_counts_and_divides_by_no_zero() -> None:
    train = np.hstack([rng.normal(0, 1, (100, 4)), np.zeros((100, 1))])
    guard = ood.Guard.fit(train, train[:30], k=3, alpha=0.01)
    lit = np.array([[0, 0, 0, 0, 5.0]])
    assert np.isfinite(guard.distances(lit)).all()
    assert guard.distances(lit)[0] > guard.threshold


def two_spaces() -> tuple[dict, dict]:
    train = {"head": rng.normal(0, 1, (40, 6)), "image_statistics": rng.normal(5, 2, (40, 3))}
    val = {"head": rng.normal(0, 1, (10, 6)), "image_statistics": rng.normal(5, 2, (10, 3))}
    return train, val


def test_the_score_is_the_worst_space_relative_to_its_threshold(tmp_path: Path) -> None:
    train, val = two_spaces()
    guards = ood.GuardSet.fit(train, val, tiny_guard_settings(alpha=0.1))
    probe = {"head": np.zeros((2, 6)), "image_statistics": np.array([[5, 5, 5], [50, 50, 50]])}
    head, stats = guards.guards["head"], guards.guards["image_statistics"]
    expected = np.maximum(head.distances(probe["head"]) / head.threshold,
                          stats.distances(probe["image_statistics"]) / stats.threshold)  # fmt: skip
    np.testing.assert_allclose(guards.scores(probe), expected)
    assert guards.scores(probe)[0] <= 1 < guards.scores(probe)[1]  # far in one space is enough
    loaded = ood.GuardSet.load(guards.save(tmp_path / ood.OOD_FILE))
    np.testing.assert_allclose(loaded.scores(probe), guards.scores(probe), rtol=1e-5)
    assert loaded.metadata() == guards.metadata()
    assert set(guards.metadata()["spaces"]) == {"head", "image_statistics"}
    # alpha is shared over the spaces; the stated rate is the sum of what each achieved
    assert head.alpha == stats.alpha == pytest.approx(0.05)
    assert guards.stated_rate == pytest.approx(head.effective_alpha + stats.effective_alpha)


def test_settings_are_checked() -> None:
    base = {"spaces": ["head"], "statistics_size": 64, "k": 5, "alpha": 0.01,
            "batch_size": 8}  # fmt: skip
    assert ood.OODSettings.from_cfg(base).spaces == ("head",)
    for change, words in ({"alpha": 0}, "alpha"), ({"alpha": 1}, "alpha"), ({"k": 0}, "k must"), (
        {"spaces": ["pixels"]}, "spaces"), ({"spaces": []}, "spaces"):  # fmt: skip
        with pytest.raises(ValueError, match=words):
            ood.OODSettings.from_cfg({**base, **change})


def test_verdict_says_why_and_never_pretends_a_check_ran() -> None:
    out = verdict(1.5)
    assert out["in_distribution"] is False and "skin photo" in out["ood_reason"]
    assert "1.5 times" in out["ood_reason"]
    assert verdict(0.5) == {"in_distribution": True, "ood": {"checked": True, "score": 0.5}}
    assert verdict(float("nan"))["ood"] == {"checked": False}
    assert verdict(None)["ood"] == {"checked": False}


def test_the_non_skin_set_has_every_kind_as_rgb_photos() -> None:
    from pox_pipeline.guard import non_skin

    kinds: dict[str, int] = {}
    for kind, _, image in non_skin.images():
        assert image.mode == "RGB" and min(image.size) >= 64
        kinds[kind] = kinds.get(kind, 0) + 1
    assert set(kinds) == set(non_skin.KINDS) and kinds["photos of objects and animals"] >= 20


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_features_are_the_input_of_the_output_layer_in_every_family(
    family: str, make_cfg: Callable[..., DictConfig]
) -> None:
    """Plain models and chained ones (the head inside the ``trainable`` sub-model) alike."""
    import keras

    overrides = {
        "cnn": ["model.cnn.padding=same"],
        "colour_texture": ["model.colour_texture.input_size=null"],
    }
    cfg = make_cfg(*overrides.get(family, []))
    model = build_model(cfg.model[family], cfg.data)
    images = rng.uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    outputs, spaces = forward.feature_extractor(model, 32, forward.FEATURE_SPACES, 32)(images)
    features = spaces["head"]
    np.testing.assert_allclose(
        outputs, np.asarray(model(images, training=False)), rtol=1e-4, atol=1e-5
    )
    (head,) = forward.head_layers(model)
    # the head applied to the features gives the model's output: they are its input
    np.testing.assert_allclose(np.asarray(head(features)), outputs, rtol=1e-4, atol=1e-5)
    assert features.shape == (3, head.kernel.shape[0])
    assert isinstance(head, keras.layers.Dense)


def test_an_ensemble_gives_every_members_features() -> None:
    from pox_pipeline.release.ensemble import build_ensemble

    members = [tiny_model(seed=0), tiny_model(seed=1)]
    ensemble = build_ensemble(members, 32, "pair")
    images = rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    settings = tiny_guard_settings(spaces=["head"])
    features = ood.features_of(ensemble, images, settings, "none")["head"]
    singles = [ood.features_of(m, images, settings, "none")["head"] for m in members]
    np.testing.assert_allclose(features, np.hstack(singles), rtol=1e-5)


def test_image_statistics_are_the_colour_texture_features_of_the_pooled_photo() -> None:
    import keras

    from pox_pipeline.models.colour_texture import ColourTextureFeatures

    images = rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    got = ood.features_of(tiny_model(), images, tiny_guard_settings(statistics_size=16), "none")
    pooled = keras.layers.AveragePooling2D(2)(images)
    expected = np.asarray(ColourTextureFeatures()(pooled))
    np.testing.assert_allclose(got["image_statistics"], expected, rtol=1e-4, atol=1e-5)
    assert forward.statistics_pool(224, 32) == 7 and forward.statistics_pool(32, 64) == 1


def test_predictor_answers_carry_the_verdict(tmp_path: Path) -> None:
    import bentoml

    stored = bentoml.models.get(save_champion())
    predictor = Predictor.from_stored(stored)
    assert predictor.guard is None  # a model published before the guard: said, not hidden
    image = rng.uniform(0, 255, (32, 32, 3)).astype(np.float32)
    (unchecked,) = predictor.predict([image])
    assert unchecked["in_distribution"] is True and unchecked["ood"] == {"checked": False}

    # a guard fitted on skin-like photos: one of them passes, a flat colour does not
    photos = skin_like_photos(24)
    settings = tiny_guard_settings()
    ood.fit_guard(predictor.model, photos[:18], photos[18:], settings, "none").save(
        Path(stored.path) / ood.OOD_FILE
    )
    guarded = Predictor.from_stored(stored)
    flat = np.full((32, 32, 3), 255.0, np.float32)
    batch = np.stack([photos[0], flat])
    scored = guarded.outputs_with_ood_score(batch)
    np.testing.assert_allclose(scored[:, :-1], guarded.outputs(batch), rtol=1e-5)
    inside, outside = guarded.predict(list(batch))
    assert inside["in_distribution"] is True and outside["in_distribution"] is False

    off = Predictor.from_stored(stored, ood_enabled=False)
    assert off.guard is None and np.isnan(off.outputs_with_ood_score(flat[None])[0, -1])


def test_test_time_views_average_every_feature_space() -> None:
    """With TTA the outputs, head features and image statistics are the means over the views,
    all from the one pass (the statistics of a flipped photo are the photo's own)."""
    from pox_pipeline.models.inference import tta_views

    images = rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    extract = forward.feature_extractor(tiny_model(), 32, forward.FEATURE_SPACES, 16)
    views = tta_views(images, "flips")
    outputs, features = extract(np.concatenate(views), n_views=len(views))
    per_view = [extract(view) for view in views]
    np.testing.assert_allclose(outputs, np.mean([o for o, _ in per_view], axis=0), rtol=1e-5)
    for space in forward.FEATURE_SPACES:
        np.testing.assert_allclose(
            features[space], np.mean([f[space] for _, f in per_view], axis=0), rtol=1e-5
        )
    np.testing.assert_allclose(features["image_statistics"],
                               per_view[0][1]["image_statistics"], atol=1e-5)  # fmt: skip


def test_an_old_guard_on_resized_statistics_is_refused(tmp_path: Path) -> None:
    """Thresholds fitted on other statistics would measure in another space: re-publish."""
    path = ood.GuardSet.fit(*two_spaces(), tiny_guard_settings()).save(tmp_path / "ood.npz")
    with np.load(path) as stored:
        arrays = {key: stored[key] for key in stored.files if key != "statistics_method"}
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="publish the model again"):
        ood.GuardSet.load(path)


def test_the_guard_is_fitted_on_the_features_the_service_computes_under_tta() -> None:
    """A champion served with flips TTA averages head features over the flipped views: the
    guard's reference is fitted on those same averaged features, not the plain ones."""
    from pox_pipeline.models.inference import tta_views

    model, images = tiny_model(), skin_like_photos(4)
    settings = tiny_guard_settings()
    fitted = ood.features_of(model, images, settings, "flips")
    extract = forward.feature_extractor(model, 32, settings.spaces, settings.statistics_size)
    views = tta_views(images, "flips")
    served = extract(np.concatenate(views), len(views))[1]
    np.testing.assert_allclose(fitted["head"], served["head"], rtol=1e-5)
    plain = ood.features_of(model, images, settings, "none")
    assert not np.allclose(fitted["head"], plain["head"], rtol=1e-3)
