"""conf/ -> params.yaml -> dvc.yaml: the composition stays in sync and stages track the
params they use."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from pox_pipeline.common.config import compose, flatten, write_params
from pox_pipeline.common.params import load_params, params_path, project_root

PROJECT_ROOT = project_root()


def test_params_yaml_equals_composition_of_conf(tmp_path: Path) -> None:
    composed = write_params(tmp_path / "params.yaml")
    committed = PROJECT_ROOT / "params.yaml"
    assert committed.read_text() == composed.read_text(), (
        "params.yaml has drifted from conf/: run `make params` "
        "(python -m pox_pipeline.common.config)"
    )


def test_every_config_group_option_composes() -> None:
    for group_dir in sorted(p for p in (PROJECT_ROOT / "conf").iterdir() if p.is_dir()):
        for option in sorted(group_dir.glob("*.yaml")):
            if group_dir.name == "model":  # selected once per model, under model.<name>
                cfg = compose([f"+model@model.probe={option.stem}"])
                assert cfg.model.probe.architecture
            elif group_dir.name == "hparams_search":  # needs a Hydra run: test_hparams_search.py
                continue
            else:
                cfg = compose([f"{group_dir.name}={option.stem}"])
                assert group_dir.name in cfg


def test_msld_data_config_points_at_shared_dataset() -> None:
    cfg = compose(["data=msld"])
    # made absolute from the project root (tests/unit/common/test_project_path.py says why)
    assert cfg.data.raw_dir == str((PROJECT_ROOT / "../shared/datasets/msld").resolve())
    assert cfg.data.classes == ["Monkeypox", "Others"]
    # the synthetic defaults are inherited, only what differs is overridden
    assert cfg.data.image_size == compose().data.image_size


def test_overrides_reach_params(tmp_path: Path) -> None:
    out = write_params(tmp_path / "params.yaml", overrides=["model.cnn.epochs=3", "seed=7"])
    params = load_params(out, overrides=["data.image_size=64"])
    assert params.model.cnn.epochs == 3
    assert params.seed == 7
    assert params.data.image_size == 64


def test_flatten_gives_dotted_keys() -> None:
    flat = flatten(OmegaConf.create({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}))
    assert flat == {"a.b": 1, "a.c.d": [1, 2], "e": "x"}


@pytest.fixture(scope="module")
def dvc_stages() -> dict[str, dict]:
    """dvc.yaml as DVC resolves it (foreach expanded, ${...} filled from params.yaml)."""
    from dvc.repo import Repo

    with Repo(str(PROJECT_ROOT)) as repo:
        return {stage.addressing: stage for stage in repo.index.stages}


def _param_keys(stage) -> set[str]:
    keys: set[str] = set()
    for dep in stage.deps:
        if hasattr(dep, "params"):
            keys.update(dep.params)
    return keys


def test_pipeline_has_one_train_evaluate_and_crosscheck_stage_per_model(dvc_stages: dict) -> None:
    models = compose().models
    expected = {"synthesize", "prepare", "select"}
    for stage in ("train", "evaluate", "crosscheck"):
        expected |= {f"{stage}@{m}" for m in models}
    assert set(dvc_stages) == expected


def test_model_stages_track_only_their_own_model_params(dvc_stages: dict) -> None:
    models = list(compose().models)
    for name in models:
        keys = _param_keys(dvc_stages[f"train@{name}"])
        assert f"model.{name}" in keys
        assert not any(k.startswith("model.") and k != f"model.{name}" for k in keys)
        assert not any(k.startswith("model.") for k in _param_keys(dvc_stages[f"evaluate@{name}"]))
        crosscheck = _param_keys(dvc_stages[f"crosscheck@{name}"])  # it retrains its own model
        assert [k for k in crosscheck if k.startswith("model.")] == [f"model.{name}"]


def test_stage_params_exist_in_params_yaml(dvc_stages: dict) -> None:
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    for stage in dvc_stages.values():
        for key in _param_keys(stage):
            node = params
            for part in key.split("."):
                assert part in node, f"{stage.addressing} declares missing param {key}"
                node = node[part]


def test_stage_help_describes_the_stage_and_its_params() -> None:
    """``--help`` answers at once (Hydra once scanned the whole project root as config
    groups, .venv included) with the stage's purpose and the overridable params."""
    result = subprocess.run(
        [sys.executable, "-m", "pox_pipeline.data.prepare", "--help"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("python -m pox_pipeline.data.prepare: The `prepare` stage")
    assert "group_pattern:" in result.stdout and "Configuration groups" not in result.stdout


@pytest.mark.parametrize(
    ("module", "first_line"),
    [("training.cv", "Patient-grouped k-fold cross-validation"),
     ("release.ensemble", "Serve an ensemble of the cross-validation fold models")],
)  # fmt: skip
def test_conf_entry_help_starts_with_its_docstring(module: str, first_line: str) -> None:
    """The entry points that compose conf/ list its groups, after saying what they do."""
    result = subprocess.run(
        [sys.executable, "-m", f"pox_pipeline.{module}", "--help"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"python -m pox_pipeline.{module}: {first_line}")
    assert "hparams_search: cnn_optuna, resnet_optuna" in result.stdout


def test_stage_outside_the_project_root_says_where_to_run(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pox_pipeline.data.prepare"], cwd=tmp_path, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    expected = f"no dvc.yaml in {tmp_path.resolve()} or any folder above it: run inside the project"
    assert expected in result.stderr


def test_the_project_is_found_from_the_working_directory_not_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second checkout sharing this environment gets its own params.yaml: the project is the
    nearest folder up from the working directory that holds dvc.yaml."""
    other = tmp_path / "other-checkout"
    shutil.copytree(PROJECT_ROOT / "conf", other / "conf")
    (other / "dvc.yaml").write_text("stages: {}\n")
    (other / "src").mkdir()
    monkeypatch.chdir(other / "src")
    assert project_root() == other
    assert params_path() == other / "params.yaml"
    assert write_params(overrides=["seed=7"]) == other / "params.yaml"
    assert load_params().seed == 7
    assert not (PROJECT_ROOT / "params.yaml").samefile(other / "params.yaml")


def test_a_stage_run_from_a_subfolder_reads_the_projects_params(tmp_path: Path) -> None:
    """Its relative paths start at the project root, where DVC runs it too."""
    result = subprocess.run(
        [sys.executable, "-m", "pox_pipeline.data.synthetic", "--cfg", "job"],
        cwd=PROJECT_ROOT / "conf", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "out_dir: datas/synthetic" in result.stdout


def test_the_params_command_helps_and_writes_where_told(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m pox_pipeline.common.config --help` explains itself (it used to crash in Hydra)."""
    from pox_pipeline.common import config

    with pytest.raises(SystemExit) as done:
        config.main(["--help"])
    assert done.value.code == 0 and "key=value" in capsys.readouterr().out
    written = config.main(["--out", str(tmp_path / "p.yaml"), "data=msld"])
    assert OmegaConf.load(written).data.raw_dir.endswith("msld")
