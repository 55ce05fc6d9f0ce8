"""MLflow plumbing shared by train, evaluate, select, cv and ensemble: one home for every run,
param, metric and logged model."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import tensorflow as tf
from mlflow.entities import Metric, Param
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from omegaconf import DictConfig

from pox_pipeline.common.config import flatten
from pox_pipeline.common.paths import run_info_file
from pox_pipeline.data.prepare import MANIFEST_NAME
from pox_pipeline.models.inference import custom_objects

# mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI itself, so only the value set before
# this process configured MLflow is the user's choice (else the first config would stick).
_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")
# Set by `dvc exp run` for every stage it runs (dvc.env.DVC_EXP_NAME).
DVC_EXP_NAME_ENV = "DVC_EXP_NAME"
# MLflow's own tag for a nested run: the UI folds children under their parent.
PARENT_RUN_TAG = "mlflow.parentRunId"
MODEL_ARTIFACT = "model"  # the logged model's name in its run (the registry registers it)


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


def dataset_tags(cfg: DictConfig) -> dict[str, str]:
    """Which data a run saw, read from the prepared manifest: the originals' folder (common to
    every ``source``), ``dataset_sha256`` over each original's class and sha256 (the data set,
    whatever its split or order) and ``split_sha256`` of the manifest itself (also groups and
    splits), so two runs on different photos or splits never look alike in the UI."""
    manifest = Path(cfg.paths.prepared_dir) / MANIFEST_NAME
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    content = "\n".join(sorted(f"{row['class']},{row['sha256']}" for row in rows))
    return {
        "dataset": os.path.commonpath([Path(r["source"]).parent for r in rows]) if rows else "",
        "dataset_sha256": hashlib.sha256(content.encode()).hexdigest(),
        "split_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
    }


def run_tags(cfg: DictConfig, stage: str) -> dict[str, str]:
    """Tags every pipeline run carries to be compared across a team: the code (git commit),
    the DVC stage, the data (:func:`dataset_tags`) and the `dvc exp` name when there is one."""
    tags = {"git_commit": git_commit(), "dvc_stage": stage, **dataset_tags(cfg)}
    if os.environ.get(DVC_EXP_NAME_ENV):
        tags["dvc_exp"] = os.environ[DVC_EXP_NAME_ENV]
    return tags


def write_run_info(cfg: DictConfig, model_name: str, info: dict[str, Any]) -> Path:
    """Record which MLflow run trained a model, so evaluate and select log to the same run."""
    path = run_info_file(cfg, model_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return path


def read_run_info(cfg: DictConfig, model_name: str) -> dict[str, Any]:
    return json.loads(run_info_file(cfg, model_name).read_text())


# Keras's per-epoch names get this prefix: its `val_auc` (uncalibrated, during training) would
# otherwise share a key with evaluate's `val_auc`, and the latest step would win in the UI.
EPOCH_METRIC_PREFIX = "epoch_"


class MlflowEpochMetrics(keras.callbacks.Callback):
    """Every per-epoch metric Keras reports (loss, accuracy, auc, their val_ twins, the learning
    rate) to the active MLflow run as ``epoch_<name>``; step = epoch counted from 1 across
    training phases."""

    def __init__(self, first_step: int = 1) -> None:
        super().__init__()
        self.first_step = first_step

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        metrics = {EPOCH_METRIC_PREFIX + key: float(value) for key, value in (logs or {}).items()}
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
        name=MODEL_ARTIFACT,
        signature=model_signature(model),
        save_exported_model=bool(custom_objects(model)),
        # explicit: inferring them re-imports TensorFlow in a subprocess (~10 s a model)
        pip_requirements=[f"keras=={keras.__version__}", f"tensorflow-cpu=={tf.__version__}"],
    )


def log_params(cfg: DictConfig) -> None:
    """The whole resolved config as dotted MLflow params (MLflow batches them itself)."""
    mlflow.log_params(flatten(cfg))


@contextlib.contextmanager
def mlflow_run(
    cfg: DictConfig, tags: dict[str, str], enabled: bool, parent_run_id: str | None = None
) -> Iterator[Any]:
    """The stage's MLflow run (None on non-chief workers, which track nothing), nested under
    ``parent_run_id`` when given (a cross-validation fold)."""
    if not enabled:
        yield None
        return
    setup_mlflow(cfg)
    with mlflow.start_run(
        run_name=f"train-{tags['model_name']}", tags=tags, parent_run_id=parent_run_id
    ) as active:
        yield active


def start_parent_run(cfg: DictConfig, run_name: str, tags: dict[str, str]) -> str:
    """A run left open for children logged from other code (the folds of a cross-validation);
    :func:`finish_parent_run` closes it. Returns its id."""
    setup_mlflow(cfg)
    experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    client = mlflow.MlflowClient()
    run = client.create_run(experiment.experiment_id, tags=tags, run_name=run_name)
    params = [Param(key, str(value)) for key, value in flatten(cfg).items()]
    client.log_batch(run.info.run_id, params=params)  # sent in MLflow's batch-sized chunks
    return run.info.run_id


@contextlib.contextmanager
def parent_runs_closed_on_failure(parents: Mapping[str, str]) -> Iterator[None]:
    """Mark the open parent runs (name -> run id) FAILED, or KILLED on Ctrl-C, when the block
    raises: left RUNNING, the MLflow UI shows a crashed cross-validation as still going."""
    try:
        yield
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        client = mlflow.MlflowClient()
        for run_id in parents.values():
            client.set_terminated(run_id, status=status)
        raise


def finish_parent_run(run_id: str, metrics: dict[str, float], artifact: Path | None) -> None:
    """Log the children's summary (mean/std) to the parent and mark it finished."""
    client = mlflow.MlflowClient()
    now_ms = int(time.time() * 1000)
    batch = [Metric(key, float(value), now_ms, 0) for key, value in metrics.items()]
    client.log_batch(run_id, metrics=batch)
    if artifact is not None:
        client.log_artifact(run_id, str(artifact))
    client.set_terminated(run_id)
