"""The suite's own rules: without ../shared the real-data tests skip on a laptop and fail the
run in CI, so a CI machine that lost the data cannot pass by skipping them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pox_pipeline.common.params import project_root

PROJECT_ROOT = project_root()
REAL_DATA_TEST = '''
from helpers.suite import requires_msld


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
    shutil.copytree(PROJECT_ROOT / "tests" / "helpers", root / "tests" / "helpers",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    (root / "tests" / "test_real_data.py").write_text(REAL_DATA_TEST)
    assert not (tmp_path / "shared").exists()
    return root


def _pytest(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "POX_REQUIRE_SHARED")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args, "tests"],
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


def test_files_with_long_fixtures_are_collected_first_whole(project_without_shared: Path) -> None:
    """`make test` hands whole files to two workers in collection order: the container's and
    the team server's files first, each file's tests together and in their own order; in the
    suite's folders (tests/unit/<package>/, tests/integration/) as at its top."""
    tests = project_without_shared / "tests"
    (tests / "unit" / "common").mkdir(parents=True)
    (tests / "integration").mkdir()
    (tests / "unit" / "common" / "test_a_plain.py").write_text("def test_one():\n    pass\n")
    (tests / "integration" / "test_b_team.py").write_text(
        "import pytest\n\npytestmark = pytest.mark.team\n\n\ndef test_team():\n    pass\n"
    )
    (tests / "integration" / "test_c_mixed.py").write_text(
        "import pytest\n\n\ndef test_first():\n    pass\n\n\n"
        "@pytest.mark.container\ndef test_image():\n    pass\n"
    )
    result = _pytest(project_without_shared, "--collect-only", "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    collected = [line for line in result.stdout.splitlines() if "::" in line]
    assert collected == [
        "tests/integration/test_c_mixed.py::test_first",
        "tests/integration/test_c_mixed.py::test_image",
        "tests/integration/test_b_team.py::test_team",
        "tests/test_real_data.py::test_needs_the_real_images",
        "tests/unit/common/test_a_plain.py::test_one",
    ]
