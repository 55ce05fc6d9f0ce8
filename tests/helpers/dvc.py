"""Running the pipeline's commands (git, dvc, pox) in a project folder from a test."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

COMMAND_TIMEOUT_S = 900


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run ``cmd``; its stdout + stderr, or a failed assertion showing their tail."""
    result = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-4000:]}"
    return output


def stages_run(output: str) -> set[str]:
    """The stages a ``dvc repro`` / ``dvc exp run`` output says it ran."""
    return {
        line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")
    }


def copy_project(source: Path, names: Iterable[str], root: Path) -> Path:
    """The project's files ``names`` (folders whole, without bytecode) copied into ``root``."""
    for name in names:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, root / name)
    return root
