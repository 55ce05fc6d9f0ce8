"""Stage `select`: choose the champion on validation metrics, register it in the MLflow
Model Registry (alias ``select.alias``) and save it to the BentoML model store.

The choice reads ``reports/eval/<name>/val_metrics.json`` and nothing else
(:func:`choose_champion` only ever sees validation numbers), so the test split stays an
unbiased estimate. The winner's test metrics are read afterwards, only to ship with the
model as metadata. Both the registry and the BentoML store are idempotent: re-running on
unchanged inputs reuses the registered version and the saved BentoML model.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bentoml
import mlflow
from bentoml.exceptions import NotFound
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from omegaconf import DictConfig

from pox_pipeline import model_card, monitor, ood, paths
from pox_pipeline.calibration import IDENTITY_TEMPERATURE, NO_CALIBRATION
from pox_pipeline.config import stage_entry
from pox_pipeline.data import load_split
from pox_pipeline.inference import NO_TTA, load_keras_model, store_keras_model
from pox_pipeline.tracking import git_commit, read_run_info, setup_mlflow

if TYPE_CHECKING:
    import keras

MLFLOW_ARTIFACT = "model"
HASH_LABEL = "content_sha256"
KERAS_MODULE = "bentoml.keras"  # the framework module of a model saved by bentoml.keras
# Metadata left out of the content hash: a new commit alone is no new model.
UNHASHED_METADATA = ("git_commit",)
# Files saved with the model but rendered from its metadata: hashed through the metadata.
UNHASHED_FILES = (model_card.MARKDOWN_FILE, model_card.HTML_FILE)


def read_val_metrics(cfg: DictConfig, model_name: str) -> dict[str, Any]:
    """The validation metrics and threshold of one candidate: all that the choice may see."""
    path = paths.eval_dir(cfg, model_name) / paths.VAL_METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `evaluate@{model_name}` first")
    return json.loads(path.read_text())


def choose_champion(
    val_metrics: Mapping[str, Mapping[str, Any]], metric: str, greater_is_better: bool
) -> str:
    """The candidate with the best validation ``metric``.

    Ties go to the candidate listed first (``models`` order), so the choice is
    deterministic. A candidate whose metric is undefined (null / nan) cannot win.
    """
    scored = []
    for order, (name, values) in enumerate(val_metrics.items()):
        if metric not in values:
            raise KeyError(f"{name}: {paths.VAL_METRICS_FILE} has no metric {metric!r}")
        value = values[metric]
        if value is not None and not math.isnan(value):
            scored.append((value if greater_is_better else -value, -order, name))
    if not scored:
        raise ValueError(f"no candidate has a defined validation {metric!r}")
    return max(scored)[2]


def read_test_metrics(cfg: DictConfig, model_name: str) -> dict[str, Any]:
    """The winner's test metrics, read after the choice only to ship as metadata ({} if absent)."""
    path = paths.eval_dir(cfg, model_name) / paths.TEST_METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def inference_settings(val_metrics: Mapping[str, Any]) -> dict[str, Any]:
    """How evaluate turned model outputs into the probabilities its threshold was set on:
    ``temperature`` and ``tta``. val_metrics.json written before calibration and TTA existed
    has neither: T = 1 and no TTA, which is what that evaluation did."""
    return {
        "calibration": val_metrics.get("calibration", NO_CALIBRATION),
        "temperature": float(val_metrics.get("temperature", IDENTITY_TEMPERATURE)),
        "tta": val_metrics.get("tta", NO_TTA),
    }


def data_metadata(cfg: DictConfig) -> dict[str, Any]:
    """What the service needs to know about the inputs and outputs of any champion."""
    return {
        "classes": list(cfg.data.classes),
        "positive_class": cfg.data.positive_class,
        "image_size": int(cfg.data.image_size),
        "resample": cfg.data.resample,
    }


def register_champion(
    cfg: DictConfig, run_id: str, tags: Mapping[str, Any]
) -> ModelVersion:
    """Register ``runs:/<run_id>/model`` (reusing a version of the same run if there is one),
    tag it and point ``select.alias`` at it."""
    name = cfg.select.registered_model_name
    client = MlflowClient()
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        version = max(existing, key=lambda v: int(v.version))
    else:
        version = mlflow.register_model(f"runs:/{run_id}/{MLFLOW_ARTIFACT}", name)
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, str(value))
    client.set_registered_model_alias(name, cfg.select.alias, version.version)
    return version


def without_nulls(values: Mapping[str, Any]) -> dict[str, Any]:
    """BentoML metadata takes no None: undefined metrics are left out."""
    return {k: v for k, v in values.items() if v is not None}


def content_hash(
    model_file: Path, metadata: Mapping[str, Any], extra_files: Mapping[str, Path] | None = None
) -> str:
    """sha256 over the model bytes, the files saved with it and the metadata that changes
    what is served."""
    digest = hashlib.sha256(model_file.read_bytes())
    for name, path in sorted((extra_files or {}).items()):
        if name not in UNHASHED_FILES:
            digest.update(name.encode() + path.read_bytes())
    hashed = {k: v for k, v in metadata.items() if k not in UNHASHED_METADATA}
    digest.update(json.dumps(hashed, sort_keys=True).encode())
    return digest.hexdigest()


def save_bentoml_model(
    cfg: DictConfig,
    model_file: Path,
    metadata: Mapping[str, Any],
    extra_files: Mapping[str, Path] | None = None,
    model: keras.Model | None = None,
) -> str:
    """Save the champion (and ``extra_files``, name -> file, beside it) to the BentoML store;
    reuse the latest if its content is identical. ``model`` is ``model_file`` already loaded.

    Only the latest counts: after A, B, A the store gets a new A, because serving loads
    ``<name>:latest``. Saved by ``bentoml.keras``, so ``bentoml.keras.load_model`` loads it.
    """
    name = cfg.select.bentoml_model_name
    sha = content_hash(model_file, metadata, extra_files)
    try:
        latest = bentoml.models.get(f"{name}:latest")
        if latest.info.labels.get(HASH_LABEL) == sha and latest.info.module == KERAS_MODULE:
            return str(latest.tag)
    except NotFound:
        pass
    labels = {HASH_LABEL: sha, "model_name": str(metadata["model_name"])}
    if model is None:
        model = load_keras_model(model_file)
    return str(store_keras_model(name, model, labels, dict(metadata), extra_files).tag)


def publish_bentoml(
    cfg: DictConfig,
    data_cfg: DictConfig,
    model_file: Path,
    metadata: Mapping[str, Any],
    run_id: str,
) -> str:
    """Serve a model: fit its out-of-distribution guard on ``data_cfg``'s prepared train and
    validation photos (``serve.ood``), write its model card, save all three to BentoML and
    log the card and guard to its MLflow run. The one publish step of select and ensemble."""
    metadata = {**metadata, **model_card.training_data_metadata(data_cfg)}
    model = load_keras_model(model_file)
    with tempfile.TemporaryDirectory() as tmp:
        extra_files = {}
        if cfg.serve.ood.enabled:
            train, val = (load_split(data_cfg, split)[0] for split in ("train", "val"))
            settings = ood.OODSettings.from_cfg(cfg.serve.ood)
            guard = ood.fit_guard(model, train, val, settings)
            metadata["ood"] = guard.metadata()
            extra_files[ood.OOD_FILE] = guard.save(Path(tmp) / ood.OOD_FILE)
        # Monitoring reference (issue 21); belongs in publish.py's list of stored files.
        if cfg.serve.monitoring.enabled:
            train, val = (load_split(data_cfg, split)[0] for split in ("train", "val"))
            files, metadata["monitoring"] = monitor.write_reference(
                model_file, metadata, train, val, cfg.serve, Path(tmp),
                extra_files.get(ood.OOD_FILE),
            )  # fmt: skip
            extra_files.update(files)
        metadata = without_nulls(metadata)
        name = cfg.select.registered_model_name
        for path in model_card.write_files(Path(tmp), name, metadata, str(cfg.serve.ui_path)):
            extra_files[path.name] = path
        tag = save_bentoml_model(cfg, model_file, metadata, extra_files, model)
        client = MlflowClient()
        for path in extra_files.values():
            client.log_artifact(run_id, str(path))
    return tag


def select(cfg: DictConfig) -> dict[str, Any]:
    """Choose, register and save the champion; writes and returns ``reports/select.json`` and
    writes the champion's compared figures to ``reports/champion.json`` (DVC metrics)."""
    metric = cfg.select.metric
    val_metrics = {name: read_val_metrics(cfg, name) for name in cfg.models}
    winner = choose_champion(val_metrics, metric, bool(cfg.select.greater_is_better))

    # From here on the choice is made; test metrics only travel with the model.
    chosen = val_metrics[winner]
    inference = inference_settings(chosen)
    run_info = read_run_info(cfg, winner)
    run_id = run_info["mlflow_run_id"]
    commit = git_commit()
    setup_mlflow(cfg)
    version = register_champion(
        cfg,
        run_id,
        {
            "model_name": winner,
            "threshold": chosen["threshold"],
            "threshold_rule": chosen["threshold_rule"],
            **inference,
            f"val_{metric}": chosen[metric],
            "git_commit": commit,
        },
    )
    metadata = {
        **data_metadata(cfg),
        "threshold": chosen["threshold"],
        "threshold_rule": chosen["threshold_rule"],
        **inference,
        "architecture": run_info["architecture"],
        "model_name": winner,
        "weights": run_info["weights"] or "none",
        "mlflow_run_id": run_id,
        "mlflow_model_version": int(version.version),
        "registered_model_name": cfg.select.registered_model_name,
        "git_commit": commit,
        "val_metrics": without_nulls(chosen),
        "test_metrics": without_nulls(read_test_metrics(cfg, winner)),
    }
    model_file = paths.model_file(cfg, winner)
    bento_tag = publish_bentoml(cfg, cfg, model_file, metadata, run_id)

    result = {
        "winner": winner,
        "metric": metric,
        "greater_is_better": bool(cfg.select.greater_is_better),
        "value": chosen[metric],
        "candidates": {
            name: {metric: values[metric], "threshold": values["threshold"]}
            for name, values in val_metrics.items()
        },
        "threshold": chosen["threshold"],
        "threshold_rule": chosen["threshold_rule"],
        **inference,
        "mlflow_run_id": run_id,
        "registered_model_name": cfg.select.registered_model_name,
        "registered_model_version": int(version.version),
        "alias": cfg.select.alias,
        "bentoml_tag": bento_tag,
    }
    out = paths.select_report(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    champion = {"champion": winner, **read_dvc_metrics(cfg, winner)}
    paths.champion_metrics(cfg).write_text(json.dumps(champion, indent=2) + "\n")
    return result


def read_dvc_metrics(cfg: DictConfig, model_name: str) -> dict[str, Any]:
    """evaluate's few compared figures of one model ({} if absent), for select's DVC metrics."""
    path = paths.eval_dir(cfg, model_name) / paths.DVC_METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def run(cfg: DictConfig) -> None:
    result = select(cfg)
    print(
        f"champion: {result['winner']} (val {result['metric']} {result['value']}), "
        f"threshold {result['threshold']}, temperature {result['temperature']:.3f}, "
        f"tta {result['tta']}, "
        f"{result['registered_model_name']} v{result['registered_model_version']} "
        f"@{result['alias']}, BentoML {result['bentoml_tag']}"
    )


main = stage_entry(run)

if __name__ == "__main__":
    main()
