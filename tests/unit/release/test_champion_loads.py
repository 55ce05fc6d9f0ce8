"""The registered champion loads anywhere (issue 11, item 2): a colour_texture model, whose
features are a layer of this package, loads by MLflow's and BentoML's own loaders in a fresh
Python in which ``pox_pipeline`` cannot even be imported, and gives the trained model's outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from pox_pipeline.common import paths
from pox_pipeline.models import inference
from pox_pipeline.models.inference import custom_objects
from pox_pipeline.release import publish, registry
from pox_pipeline.training import train
from pox_pipeline.training.tracking import setup_mlflow

# Runs in the fresh interpreter: pox_pipeline is blocked before anything else is imported.
LOADERS = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoPoxPipeline(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "pox_pipeline":
                raise ModuleNotFoundError(f"{name} is blocked in this interpreter")

    sys.meta_path.insert(0, NoPoxPipeline())
    import bentoml, mlflow, numpy as np

    batch = np.load(sys.argv[1])
    uri = "models:/" + sys.argv[2]
    # Each loaded model stays referenced while it runs (a SavedModel's variables go with it).
    loaded = {
        "mlflow.pyfunc": mlflow.pyfunc.load_model(uri),
        "mlflow.keras": mlflow.keras.load_model(uri),
        "bentoml.keras": bentoml.keras.load_model(sys.argv[3]),
    }
    outputs = {
        "mlflow.pyfunc": loaded["mlflow.pyfunc"].predict(batch),
        "mlflow.keras": loaded["mlflow.keras"].serve(batch),
        "bentoml.keras": loaded["bentoml.keras"](batch, training=False),
    }
    print(json.dumps({k: np.asarray(v).ravel().tolist() for k, v in outputs.items()}))
    """
)


def test_colour_texture_champion_loads_without_the_package(prepared_cfg, tmp_path: Path) -> None:
    # one fit (no k-fold): what is checked is how the saved model loads, not how it was fitted
    cfg = prepared_cfg("model.colour_texture.input_size=null", "model.colour_texture.epochs=2",
                       "train.verbose=0", "train.refit.folds=0")
    info = train.train(cfg, "colour_texture")
    model_file = paths.model_file(cfg, "colour_texture")
    model = inference.load_keras_model(model_file)
    assert custom_objects(model), "the model holds this package's layer: the case under test"

    setup_mlflow(cfg)
    version = registry.register_champion(
        cfg, info["mlflow_run_id"], {"model_name": "colour_texture"}
    )
    tag = publish.save_bentoml_model(cfg, model_file, {"model_name": "colour_texture"})
    batch = np.random.default_rng(0).uniform(0, 255, (3, *model.input_shape[1:])).astype("float32")
    np.save(tmp_path / "batch.npy", batch)
    expected = np.asarray(model(batch, training=False)).ravel()

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = cfg.mlflow.tracking_uri
    alias = f"{cfg.select.registered_model_name}@{cfg.select.alias}"
    done = subprocess.run(
        [sys.executable, "-c", LOADERS, str(tmp_path / "batch.npy"), alias, tag],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = json.loads(done.stdout.strip().splitlines()[-1])
    assert int(version.version) == 1
    assert set(outputs) == {"mlflow.pyfunc", "mlflow.keras", "bentoml.keras"}
    for loader, got in outputs.items():
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=loader)
