"""The out-of-distribution guard: the distance rule, the features it reads in every model
family, and its verdict in the service's answers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig

from pox_pipeline import ood, serve
from pox_pipeline.models import FACTORIES, build_model
from serve_helpers import save_champion, tiny_model

rng = np.random.default_rng(0)


def test_guard_flags_points_far_from_the_training_cloud() -> None:
    train = rng.normal(0, 1, (200, 8))
    val = rng.normal(0, 1, (50, 8))
    guard = ood.Guard.fit(train, val, k=5, quantile=0.9)
    # the threshold is the validation quantile: about 10% of validation photos are above it
    assert np.mean(guard.distances(val) > guard.threshold) == pytest.approx(0.1, abs=0.03)
    near, far = guard.distances(np.vstack([np.zeros(8), np.full(8, 6.0)]))
    assert near < guard.threshold < far


def test_a_unit_silent_in_training_counts_and_divides_by_no_zero() -> None:
    train = np.hstack([rng.normal(0, 1, (100, 4)), np.zeros((100, 1))])
    guard = ood.Guard.fit(train, train[:30], k=3, quantile=1.0)
    lit = np.array([[0, 0, 0, 0, 5.0]])
    assert np.isfinite(guard.distances(lit)).all()
    assert guard.distances(lit)[0] > guard.threshold


def test_guard_round_trips_through_its_file(tmp_path: Path) -> None:
    guard = ood.Guard.fit(rng.normal(0, 1, (40, 6)), rng.normal(0, 1, (10, 6)), 3, 0.95)
    loaded = ood.Guard.load(guard.save(tmp_path / ood.OOD_FILE))
    probe = rng.normal(0, 2, (5, 6))
    np.testing.assert_allclose(loaded.distances(probe), guard.distances(probe), rtol=1e-5)
    assert loaded.metadata() == guard.metadata()


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="quantile"):
        ood.OODSettings.from_cfg({"enabled": True, "k": 5, "quantile": 0, "batch_size": 8})
    with pytest.raises(ValueError, match="k must"):
        ood.OODSettings.from_cfg({"enabled": True, "k": 0, "quantile": 0.9, "batch_size": 8})


def test_verdict_says_why_and_never_pretends_a_check_ran() -> None:
    out = ood.verdict(3.0, 2.0)
    assert out["in_distribution"] is False and "skin photo" in out["ood_reason"]
    assert ood.verdict(1.0, 2.0) == {
        "in_distribution": True, "ood": {"checked": True, "distance": 1.0, "threshold": 2.0}
    }
    assert ood.verdict(float("nan"), 2.0)["ood"] == {"checked": False}
    assert ood.verdict(1.0, None)["ood"] == {"checked": False}


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
    outputs, features = ood.feature_extractor(model, 32)(images)
    np.testing.assert_allclose(outputs, np.asarray(model(images, training=False)), rtol=1e-4, atol=1e-5)
    (head,) = ood.head_layers(model)
    # the head applied to the features gives the model's output: they are its input
    np.testing.assert_allclose(np.asarray(head(features)), outputs, rtol=1e-4, atol=1e-5)
    assert features.shape == (3, head.kernel.shape[0])
    assert isinstance(head, keras.layers.Dense)


def test_an_ensemble_gives_every_members_features() -> None:
    from pox_pipeline.ensemble import build_ensemble

    members = [tiny_model(seed=0), tiny_model(seed=1)]
    ensemble = build_ensemble(members, 32, "pair")
    images = rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    _, features = ood.feature_extractor(ensemble, 32)(images)
    singles = [ood.feature_extractor(m, 32)(images)[1] for m in members]
    np.testing.assert_allclose(features, np.hstack(singles), rtol=1e-5)


def test_predictor_answers_carry_the_verdict(tmp_path: Path) -> None:
    import bentoml

    stored = bentoml.models.get(save_champion())
    predictor = serve.Predictor.from_stored(stored)
    assert predictor.guard is None  # a model published before the guard: said, not hidden
    image = rng.uniform(0, 255, (32, 32, 3)).astype(np.float32)
    (unchecked,) = predictor.predict([image])
    assert unchecked["in_distribution"] is True and unchecked["ood"] == {"checked": False}

    # a guard whose reference is this very image: it passes, a flat colour does not
    features = ood.feature_extractor(predictor.model, 32)(image[None])[1]
    reference = np.vstack([features + rng.normal(0, 1e-3, features.shape) for _ in range(6)])
    ood.Guard.fit(reference, reference[:2], 3, 1.0).save(Path(stored.path) / ood.OOD_FILE)
    metadata = {**stored.info.metadata, "ood": {"threshold": 0.0}}
    card = serve.ModelCard.from_metadata("pox-classifier", "v", metadata)
    guarded = serve.Predictor(Path(stored.path), card)
    flat = np.full((32, 32, 3), 255.0, np.float32)
    scored = guarded.outputs_with_distance(np.stack([image, flat]))
    np.testing.assert_allclose(scored[:, :-1], guarded.outputs(np.stack([image, flat])), rtol=1e-5)
    _, distances = serve.split_distance(scored)
    assert distances[0] < distances[1]

    off = serve.Predictor(Path(stored.path), card, ood_enabled=False)
    assert off.guard is None and np.isnan(off.outputs_with_distance(flat[None])[0, -1])
