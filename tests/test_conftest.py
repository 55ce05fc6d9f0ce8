"""The suite's own rules: without ../shared the real-data tests skip on a laptop and fail the
run in CI, so a CI machine that lost the data cannot pass by skipping them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pox_pipeline.config import project_root

PROJECT_ROOT = project_root()
REAL_DATA_TEST = '''
from conftest import requires_msld


@requires_msld
def test_needs_the_real_images():
    pass
'''


@pytest.fixture
def project_without_shared(tmp_path: Path) -> Path:
    """The suite's conftest and settings in a project that has no ../shared beside it."""
    root = tmp_path / "project"
    (root / "tests").mkdir(parents=True)
    for name in ("pyproject.toml", "dvc.yaml"):
        shutil.copy(PROJECT_ROOT / name, root / name)
    shutil.copy(PROJECT_ROOT / "tests" / "conftest.py", root / "tests" / "conftest.py")
    (root / "tests" / "test_real_data.py").write_text(REAL_DATA_TEST)
    assert not (tmp_path / "shared").exists()
    return root


def _pytest(root: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "POX_REQUIRE_SHARED")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests"],
        cwd=root, env={**clean, **env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_missing_real_data_skips_outside_ci(project_without_shared: Path) -> None:
    result = _pytest(project_without_shared)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout and "real MSLD images not found" in result.stdout


@pytest.mark.parametrize("env", [{"CI": "true"}, {"POX_REQUIRE_SHARED": "1"}])
def test_missing_real_data_fails_the_run_in_ci(
    project_without_shared: Path, env: dict[str, str]
) -> None:
    result = _pytest(project_without_shared, **env)
    assert result.returncode != 0
    assert "1 selected tests need them" in result.stderr
