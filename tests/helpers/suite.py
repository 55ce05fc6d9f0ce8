"""The suite's settings, shared by tests/conftest.py and the test modules (which never import
conftest itself)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pox_pipeline.common.params import project_root

PROJECT_ROOT = project_root()

MSLD_DIR = (PROJECT_ROOT / ".." / "shared" / "datasets" / "msld").resolve()
TEST_IMAGE_SIZE = 32

REQUIRE_SHARED_ENV = "POX_REQUIRE_SHARED"
# Tests marked `msld` need the real images: they skip, saying why, where ../shared is absent,
# and fail the run instead in CI (CI=true) or with POX_REQUIRE_SHARED=1 (tests/conftest.py).
requires_msld = pytest.mark.msld


def shared_required() -> bool:
    return os.environ.get(REQUIRE_SHARED_ENV) == "1" or os.environ.get("CI", "").lower() == "true"


def tmp_overrides(root: Path) -> list[str]:
    """Overrides that send every output of the pipeline under ``root`` and keep images tiny."""
    return [
        f"paths.prepared_dir={root}/datas/prepared",
        f"paths.models_dir={root}/models",
        f"paths.reports_dir={root}/reports",
        f"synthetic.out_dir={root}/datas/synthetic",
        f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db",
        f"train.embedding_cache.dir={root}/.cache/embeddings",
        f"data.image_size={TEST_IMAGE_SIZE}",
        f"synthetic.image_size={TEST_IMAGE_SIZE * 2}",
        "synthetic.patients_per_class=8",
    ]
