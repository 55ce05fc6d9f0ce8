"""Champion selection: the choice sees validation metrics only; registry alias and BentoML
model are created once and reused when nothing changed."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from omegaconf import DictConfig

from helpers.training import fake_trained_model
from pox_pipeline.release.select import choose_champion, select
from pox_pipeline.training.tracking import setup_mlflow

METADATA_KEYS = {
    "classes", "positive_class", "threshold", "image_size", "resample", "architecture",
    "model_name", "weights", "mlflow_run_id", "mlflow_model_version",
    "registered_model_name", "git_commit", "selection_metrics", "test_metrics",
    "calibration", "temperature", "tta",
}


def test_choose_champion_on_the_metric_with_deterministic_ties() -> None:
    vals = {"a": {"m": 0.8}, "b": {"m": 0.9}, "c": {"m": 0.9}}
    assert choose_champion(vals, "m", greater_is_better=True) == "b"  # tie: first listed
    assert choose_champion(dict(reversed(vals.items())), "m", True) == "c"
    assert choose_champion(vals, "m", greater_is_better=False) == "a"
    undefined = {"a": {"m": None}, "b": {"m": math.nan}, "c": {"m": 0.1}}
    assert choose_champion(undefined, "m", greater_is_better=True) == "c"
    with pytest.raises(ValueError, match="no candidate"):
        choose_champion({"a": {"m": None}}, "m", True)
    with pytest.raises(KeyError, match="no metric"):
        choose_champion({"a": {"x": 1.0}}, "m", True)


def _write_eval(cfg: DictConfig, name: str, file: str, content: str) -> None:
    out = Path(cfg.paths.reports_dir) / "eval" / name
    out.mkdir(parents=True, exist_ok=True)
    (out / file).write_text(content)


def _val(auc: float, threshold: float) -> str:
    return json.dumps(
        {"threshold": threshold, "threshold_rule": "fixed", "auc": auc,
         "balanced_accuracy": None, "n_val": 10}
    )


@pytest.fixture
def candidates(prepared_cfg: Callable[..., DictConfig]) -> DictConfig:
    """cnn and vgg16 'trained'; vgg16 is better on val, cnn looks better on test. The prepared
    split is there for the out-of-distribution guard, fitted at publish."""
    cfg = prepared_cfg(
        "models=[cnn,vgg16]", f"select.bentoml_model_name=pox-test-{uuid.uuid4().hex[:8]}"
    )
    assert list(cfg.models) == ["cnn", "vgg16"]
    for seed, name in enumerate(cfg.models):
        fake_trained_model(cfg, name, seed=seed)
    _write_eval(cfg, "cnn", "selection_metrics.json", _val(0.70, 0.4))
    _write_eval(cfg, "vgg16", "selection_metrics.json", _val(0.90, 0.3))
    # would win on test, and is garbage: select must never look at it
    _write_eval(cfg, "cnn", "test_metrics.json", "{balanced_accuracy: 1.0, not json")
    _write_eval(cfg, "cnn", "metrics.json", "{auc: 1.0, not json")
    return cfg


def test_select_registers_saves_and_is_idempotent(
    candidates: DictConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bentoml

    from pox_pipeline.release import select as select_module

    cfg = candidates
    test_metrics_read = []
    read_test_metrics = select_module.read_test_metrics

    def spy(cfg: DictConfig, model_name: str) -> dict:
        test_metrics_read.append(model_name)
        return read_test_metrics(cfg, model_name)

    monkeypatch.setattr(select_module, "read_test_metrics", spy)
    first = select(cfg)
    assert first["winner"] == "vgg16"  # val decides; cnn's (garbage) test metrics unread
    assert test_metrics_read == ["vgg16"]  # only the winner's, to ship as metadata
    assert first["threshold"] == 0.3
    assert first["candidates"] == {  # a fixed split: no fold spread, only the best is eligible
        "cnn": {"mean": 0.70, "se": None, "pooled": 0.70, "eligible": False},
        "vgg16": {"mean": 0.90, "se": None, "pooled": 0.90, "eligible": True},
    }
    on_disk = json.loads((Path(cfg.paths.reports_dir) / "select.json").read_text())
    assert on_disk == first
    champion_json = Path(cfg.paths.reports_dir) / "champion.json"  # DVC metrics
    assert json.loads(champion_json.read_text()) == {"champion": "vgg16"}  # no figures yet

    name = cfg.select.registered_model_name
    client = MlflowClient()
    champion = client.get_model_version_by_alias(name, "champion")
    assert int(champion.version) == first["registered_model_version"] == 1
    assert champion.run_id == json.loads(
        (Path(cfg.paths.models_dir) / "vgg16" / "run.json").read_text()
    )["mlflow_run_id"]
    assert champion.tags["threshold"] == "0.3" and champion.tags["model_name"] == "vgg16"

    bento = bentoml.models.get(first["bentoml_tag"])
    assert METADATA_KEYS <= set(bento.info.metadata)
    assert bento.info.metadata["threshold"] == 0.3
    assert bento.info.metadata["test_metrics"] == {}  # the winner has no test_metrics.json
    assert bento.info.metadata["selection_metrics"]["auc"] == 0.90
    # selection_metrics.json from before calibration / TTA: what that evaluation did, T = 1, no TTA
    assert bento.info.metadata["temperature"] == 1.0 and bento.info.metadata["tta"] == "none"
    # the out-of-distribution guard and the model card travel with the model and its run
    spaces = bento.info.metadata["ood"]["spaces"]
    assert set(spaces) == {"head", "image_statistics"}  # publish.guard.spaces
    assert all(part["reference_photos"] > 0 and part["threshold"] > 0 for part in spaces.values())
    assert bento.info.metadata["split"]["group_pattern"] == cfg.data.group_pattern
    served_files = {path.name for path in Path(bento.path).iterdir()}
    assert {"ood.npz", "model_card.md", "model_card.html"} <= served_files
    logged = {a.path for a in MlflowClient().list_artifacts(first["mlflow_run_id"])}
    assert {"ood.npz", "model_card.md", "model_card.html"} <= logged
    assert "Not a diagnosis" in (Path(bento.path) / "model_card.md").read_text()
    # publish.backends, converted at publish and measured on the evidence and test photos
    backends = bento.info.metadata["backends"]
    assert list(backends) == ["keras", *cfg.publish.backends]
    for backend in cfg.publish.backends:
        assert (backends[backend]["file"] in served_files) == backends[backend]["published"]
        assert {"evidence", "test", "label_agreement", "ms_per_photo"} <= set(backends[backend])
    check = bento.info.metadata["backend_check"]
    assert check["evidence_photos"] > 0 and check["test_photos"] > 0
    assert "## Serving backends" in (Path(bento.path) / "model_card.md").read_text()

    # the registered champion and the BentoML model (saved by bentoml.keras) are the vgg16 model
    import keras

    batch = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    expected = keras.saving.load_model(Path(cfg.paths.models_dir) / "vgg16" / "model.keras")
    setup_mlflow(cfg)  # what a team does: MLflow's own loader, on the registry alias
    champion_uri = f"models:/{cfg.select.registered_model_name}@{cfg.select.alias}"
    champion_model = mlflow.keras.load_model(champion_uri)
    np.testing.assert_allclose(champion_model.predict_on_batch(batch), expected(batch), rtol=1e-5)
    assert bento.info.module == "bentoml.keras"
    from_bentoml = bentoml.keras.load_model(bento.tag)
    np.testing.assert_allclose(from_bentoml(batch), expected(batch), rtol=1e-5)

    # unchanged inputs: no new registry version, no new BentoML model
    second = select(cfg)
    assert second == first
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert len(bentoml.models.list(cfg.select.bentoml_model_name)) == 1

    # cnn wins on val -> version 2; back to vgg16 -> version 1 again, served model follows
    _write_eval(cfg, "cnn", "selection_metrics.json", _val(0.95, 0.4))
    cnn_test = {"balanced_accuracy": 1.0, "n_test": 9}
    _write_eval(cfg, "cnn", "test_metrics.json", json.dumps(cnn_test))
    _write_eval(cfg, "cnn", "metrics.json", json.dumps({"test": {"balanced_accuracy": 1.0}}))
    assert select(cfg)["registered_model_version"] == 2
    _write_eval(cfg, "cnn", "selection_metrics.json", _val(0.70, 0.4))
    back = select(cfg)
    assert back["registered_model_version"] == 1
    assert int(client.get_model_version_by_alias(name, "champion").version) == 1
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
    latest = bentoml.models.get(f"{cfg.select.bentoml_model_name}:latest")
    assert back["bentoml_tag"] == str(latest.tag)
    assert latest.info.metadata["model_name"] == "vgg16"

    # the winner's test metrics ship as metadata; better test numbers elsewhere change nothing
    vgg16_test = {"balanced_accuracy": 0.1, "n_test": 9}
    _write_eval(cfg, "vgg16", "test_metrics.json", json.dumps(vgg16_test))
    compared = {"val": {"auc": 0.9}, "test": {"balanced_accuracy": 0.1}}
    _write_eval(cfg, "vgg16", "metrics.json", json.dumps(compared))
    shipped = select(cfg)
    assert shipped["winner"] == "vgg16" and shipped["registered_model_version"] == 1
    metadata = bentoml.models.get(shipped["bentoml_tag"]).info.metadata
    assert metadata["test_metrics"] == {"balanced_accuracy": 0.1, "n_test": 9}
    assert json.loads(champion_json.read_text()) == {"champion": "vgg16", **compared}


def test_select_ships_the_temperature_and_tta_of_the_winner(candidates: DictConfig) -> None:
    """The served model computes what evaluate computed: same T, same TTA, same threshold."""
    import bentoml

    from pox_pipeline.serving.policy import DecisionPolicy

    cfg = candidates
    calibrated = {**json.loads(_val(0.90, 0.3)), "calibration": "temperature",
                  "temperature": 1.7, "tta": "flips"}  # fmt: skip
    _write_eval(cfg, "vgg16", "selection_metrics.json", json.dumps(calibrated))
    result = select(cfg)
    assert result["winner"] == "vgg16"
    shipped = (result["temperature"], result["tta"], result["calibration"])
    assert shipped == (1.7, "flips", "temperature")
    stored = bentoml.models.get(result["bentoml_tag"])
    assert stored.info.metadata["temperature"] == 1.7
    assert stored.info.metadata["tta"] == "flips"
    assert stored.info.metadata["calibration"] == "temperature"
    card = DecisionPolicy.from_stored(stored)
    assert (card.temperature, card.tta, card.threshold) == (1.7, "flips", 0.3)
    version = MlflowClient().get_model_version(
        cfg.select.registered_model_name, str(result["registered_model_version"])
    )
    assert version.tags["temperature"] == "1.7" and version.tags["tta"] == "flips"

    # a new temperature alone is a new BentoML model: the served probabilities change
    recalibrated = json.dumps({**calibrated, "temperature": 1.2})
    _write_eval(cfg, "vgg16", "selection_metrics.json", recalibrated)
    again = select(cfg)
    assert again["bentoml_tag"] != result["bentoml_tag"]
    assert bentoml.models.get(again["bentoml_tag"]).info.metadata["temperature"] == 1.2


def test_missing_selection_metrics_is_a_clear_error(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg()
    _write_eval(cfg, "cnn", "selection_metrics.json", _val(0.70, 0.4))
    with pytest.raises(FileNotFoundError, match="evaluate@vgg16"):
        select(cfg)
