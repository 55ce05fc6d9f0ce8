"""Serving is kept apart by contract: importing the service loads no offline machinery."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers.serve import save_champion
from helpers.suite import PROJECT_ROOT

# What the offline side uses and the service must never load (start-up time, image size, and
# the attack surface of a process that reads uploads).
OFFLINE_LIBRARIES = ("mlflow", "dvc", "hydra", "optuna", "scipy", "pandas", "matplotlib",
                     "sklearn")  # fmt: skip
OFFLINE_PACKAGES = tuple(f"pox_pipeline.{p}" for p in ("data", "training", "release", "ops"))


def test_importing_the_service_loads_no_offline_module() -> None:
    save_champion()  # service.py resolves the champion's tag at import
    script = "import json, sys; import service; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True,
        env={**os.environ, "POX_PARAMS": str(PROJECT_ROOT / "params.yaml")}, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert "pox_pipeline.serving.predictor" in loaded  # the walk saw the service's own imports
    offline = [
        name for name in loaded
        if name.split(".")[0] in OFFLINE_LIBRARIES or name.startswith(OFFLINE_PACKAGES)
    ]  # fmt: skip
    assert not offline, f"importing service.py loaded {offline}"
