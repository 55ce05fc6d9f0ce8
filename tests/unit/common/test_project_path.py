"""`${pox.abspath:...}`: a folder outside the project becomes absolute, from the project root,
when conf/ is composed (by us or by DVC), so that it holds in DVC's copies of the project;
folders inside the project stay relative. tests/integration/test_dvc_workspaces.py runs DVC's
workspaces themselves."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pox_pipeline.common.config import compose, write_params
from pox_pipeline.common.params import project_path, project_root, register_path_resolver

PROJECT_ROOT = project_root()
SHARED_MSLD = (PROJECT_ROOT / ".." / "shared" / "datasets" / "msld").resolve()


def test_a_relative_path_starts_at_the_project_root_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "project"
    monkeypatch.chdir(tmp_path)
    assert project_path("../shared/x", root) == tmp_path / "shared" / "x"
    assert project_path("datas/synthetic", root) == root / "datas" / "synthetic"
    assert project_path("/data/site", root) == Path("/data/site")
    assert project_path("~/photos", root) == (Path.home() / "photos").resolve()


def test_without_a_root_the_project_is_found_from_the_working_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(PROJECT_ROOT / "conf")
    assert project_path("../shared") == SHARED_MSLD.parent.parent


def test_the_resolver_starts_where_it_was_registered(tmp_path: Path) -> None:
    register_path_resolver(tmp_path / "project")
    try:
        cfg = OmegaConf.create({"dir": "${pox.abspath:../shared/msid}"})
        assert cfg.dir == str(tmp_path / "shared" / "msid")
    finally:
        register_path_resolver(PROJECT_ROOT)


def test_msld_composes_to_the_folder_beside_the_composed_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The project is the one whose conf/ is composed, wherever the process runs."""
    shutil.copytree(PROJECT_ROOT / "conf", tmp_path / "copy" / "conf")
    monkeypatch.chdir(PROJECT_ROOT)
    copy = compose(["data=msld"], conf_dir=tmp_path / "copy" / "conf")
    assert copy.data.raw_dir == str(tmp_path / "shared" / "datasets" / "msld")
    assert compose(["data=msld"]).data.raw_dir == str(SHARED_MSLD)


def test_the_default_params_name_no_folder_of_this_machine(tmp_path: Path) -> None:
    """The committed params.yaml (synthetic data) works in any clone: in-project paths stay
    relative."""
    text = write_params(tmp_path / "params.yaml").read_text()
    assert str(PROJECT_ROOT) not in text and str(SHARED_MSLD.parent) not in text
    assert OmegaConf.load(tmp_path / "params.yaml").data.raw_dir == "datas/synthetic"


def test_dvcs_own_composition_finds_the_resolver_in_hydra_plugins(tmp_path: Path) -> None:
    """As `dvc exp run -S data=msld` composes: a fresh process (no resolver registered), from
    another directory, with the repository root as Hydra's plugins path."""
    out = tmp_path / "params.yaml"
    script = (
        "import sys; from dvc.utils.hydra import compose_and_dump; "
        "compose_and_dump(sys.argv[1], sys.argv[2], None, 'config', sys.argv[3], ['data=msld'])"
    )
    args = [str(out), str(PROJECT_ROOT / "conf"), str(PROJECT_ROOT)]
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert OmegaConf.load(out).data.raw_dir == str(SHARED_MSLD)
