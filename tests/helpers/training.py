"""A tiny stand-in for `train`: a Keras model saved and logged exactly as the contract says
(``models/<name>/model.keras``, ``run.json``, an MLflow run with the model as artifact
``model``), so evaluate and select can be tested in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from helpers.models import tiny_model


def fake_trained_model(cfg: DictConfig, model_name: str, n_classes: int = 2, seed: int = 0):
    """Save, log and record a tiny model as `train` would; returns the Keras model."""
    import keras
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from pox_pipeline.training.tracking import setup_mlflow, write_run_info

    size = int(cfg.data.image_size)
    model = tiny_model(size, n_classes, seed)
    path = Path(cfg.paths.models_dir) / model_name / "model.keras"
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    units = 1 if n_classes == 2 else n_classes
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, size, size, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, units))]),
    )
    setup_mlflow(cfg)
    with mlflow.start_run(run_name=model_name) as run:
        # explicit requirements: inferring them re-imports TensorFlow in a subprocess (~10 s)
        mlflow.keras.log_model(
            model,
            name="model",
            signature=signature,
            pip_requirements=[f"keras=={keras.__version__}"],
        )
    write_run_info(
        cfg,
        model_name,
        {
            "mlflow_run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "model_name": model_name,
            "architecture": "tiny",
            "weights": None,
            "epochs_run": 0,
            "best_epoch": 0,
            "wall_seconds": 0.0,
            "cpu_count": 1,
            "embedding_cache": False,
        },
    )
    return model
