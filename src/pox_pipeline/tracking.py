"""MLflow plumbing shared by the train, evaluate and select stages."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from omegaconf import DictConfig

from pox_pipeline.paths import run_info_file

if TYPE_CHECKING:
    pass

# mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI itself, so only the value set before
# this process configured MLflow is the user's choice (else the first config would stick).
_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def setup_mlflow(cfg: DictConfig) -> str:
    """Point MLflow at the configured store (``MLFLOW_TRACKING_URI`` wins) and experiment."""
    uri = _USER_TRACKING_URI or cfg.mlflow.tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.mlflow.experiment)
    return uri


def git_commit() -> str:
    """The commit the code ran at, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_run_info(cfg: DictConfig, model_name: str, info: dict[str, Any]) -> Path:
    """Record which MLflow run trained a model, so evaluate and select log to the same run."""
    path = run_info_file(cfg, model_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return path


def read_run_info(cfg: DictConfig, model_name: str) -> dict[str, Any]:
    return json.loads(run_info_file(cfg, model_name).read_text())
