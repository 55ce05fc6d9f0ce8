"""The MLflow Model Registry side of a release: one home for registering a champion and moving
its alias (``select`` and ``ensemble`` both publish through it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from omegaconf import DictConfig

from pox_pipeline.training.tracking import MODEL_ARTIFACT


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
        version = mlflow.register_model(f"runs:/{run_id}/{MODEL_ARTIFACT}", name)
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, str(value))
    client.set_registered_model_alias(name, cfg.select.alias, version.version)
    return version
