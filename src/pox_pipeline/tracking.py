"""MLflow plumbing shared by train, evaluate, select, cv and ensemble: one home for every run,
param, metric and logged model."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import tensorflow as tf
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from omegaconf import DictConfig

from pox_pipeline.config import flatten
from pox_pipeline.features import custom_objects
from pox_pipeline.paths import run_info_file

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


# run.json's ``protocol``: refitted after patient-grouped k-fold (train.refit.folds >= 2;
# models/<name>/oof.csv holds the out-of-fold predictions), or fitted on one fixed split
OUT_OF_FOLD_PROTOCOL = "cv_refit"
FIXED_SPLIT_PROTOCOL = "fixed_split"


def write_run_info(cfg: DictConfig, model_name: str, info: dict[str, Any]) -> Path:
    """Record which MLflow run trained a model, so evaluate and select log to the same run."""
    path = run_info_file(cfg, model_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return path


def read_run_info(cfg: DictConfig, model_name: str) -> dict[str, Any]:
    return json.loads(run_info_file(cfg, model_name).read_text())


class MlflowEpochMetrics(keras.callbacks.Callback):
    """Every per-epoch metric Keras reports (loss, accuracy, auc, their val_ twins, the learning
    rate) to the active MLflow run; step = epoch counted from 1 across training phases."""

    def __init__(self, first_step: int = 1) -> None:
        super().__init__()
        self.first_step = first_step

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        metrics = {key: float(value) for key, value in (logs or {}).items()}
        mlflow.log_metrics(metrics, step=self.first_step + epoch)



def model_signature(model: keras.Model) -> ModelSignature:
    """Explicit MLflow signature: float32 (-1, S, S, 3) images in, class scores out."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *model.input_shape[1:]))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *model.output_shape[1:]))]),
    )


def log_keras_model(model: keras.Model) -> None:
    """The model as the active run's ``model`` artifact, with an explicit signature.

    A model with a layer of this package (colour_texture's features) is logged as a TensorFlow
    SavedModel export: MLflow's Keras 3 flavor takes no ``code_paths`` or custom objects, so
    its ``.keras`` file would load only where pox_pipeline is imported first. The export loads
    by ``mlflow.pyfunc`` and ``mlflow.keras`` (an object with ``serve(batch)``) wherever
    TensorFlow is installed; every other model stays a ``.keras`` file (a ``keras.Model``).
    """
    mlflow.keras.log_model(
        model,
        name="model",
        signature=model_signature(model),
        save_exported_model=bool(custom_objects(model)),
        # explicit: inferring them re-imports TensorFlow in a subprocess (~10 s a model)
        pip_requirements=[f"keras=={keras.__version__}", f"tensorflow-cpu=={tf.__version__}"],
    )


def log_params(cfg: DictConfig) -> None:
    """The whole resolved config as dotted MLflow params (MLflow batches them itself)."""
    mlflow.log_params(flatten(cfg))


@contextlib.contextmanager
def mlflow_run(cfg: DictConfig, tags: dict[str, str], enabled: bool) -> Iterator[Any]:
    """The stage's MLflow run (None on non-chief workers, which track nothing)."""
    if not enabled:
        yield None
        return
    setup_mlflow(cfg)
    with mlflow.start_run(run_name=f"train-{tags['model_name']}", tags=tags) as active:
        yield active
