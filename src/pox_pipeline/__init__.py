"""pox-pipeline: mpox skin-lesion classification with Hydra, DVC, MLflow and BentoML."""

import os

__version__ = "0.1.0"

# Telemetry off wherever the package runs (DVC, BentoML and MLflow all phone home by default).
for _var, _value in (
    ("DVC_NO_ANALYTICS", "1"),
    ("BENTOML_DO_NOT_TRACK", "true"),
    ("MLFLOW_DISABLE_TELEMETRY", "true"),
    ("TF_CPP_MIN_LOG_LEVEL", "2"),
):
    os.environ.setdefault(_var, _value)
