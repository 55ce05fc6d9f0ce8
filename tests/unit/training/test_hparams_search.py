"""conf/hparams_search/: the Optuna search spaces name knobs that exist, and a real (tiny)
sweep optimises the mean *validation* objective of cross-validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from pox_pipeline.common.params import project_root
from pox_pipeline.training.cv import objective, summarise

pytestmark = pytest.mark.long  # minutes in all: `make test` starts this file early

PROJECT_ROOT = project_root()
CONF_DIR = PROJECT_ROOT / "conf"

SEARCHES = sorted(path.stem for path in (CONF_DIR / "hparams_search").glob("*.yaml"))
OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
MISSING = object()
N_TRIALS = 3
# The tiny synthetic set and settings of tests/unit/training/test_cv.py: 2 folds of a 1-epoch CNN.
TINY = [
    "data.image_size=32",
    "model.cnn.padding=same",
    "model.cnn.epochs=1",
    "evaluate.bootstrap.samples=20",
    "cv.folds=2",
    "train.verbose=0",
]


def compose_search(name: str, *overrides: str) -> DictConfig:
    """conf/ with one search selected, Hydra's own config (the sweeper) included, unresolved:
    ``${hydra:runtime.output_dir}`` only resolves inside a run."""
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return compose(
            config_name="config",
            overrides=[f"hparams_search={name}", *overrides],
            return_hydra_config=True,
        )


def test_there_are_searches() -> None:
    assert {"cnn_optuna", "resnet_optuna"} <= set(SEARCHES)


@pytest.mark.parametrize("name", SEARCHES)
def test_search_space_names_existing_knobs_of_its_one_model(name: str) -> None:
    cfg = compose_search(name)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == OPTUNA_SWEEPER
    assert sweeper.direction == "maximize" and sweeper.n_jobs == 1
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.sampler.seed is not None
    assert len(cfg.cv.models) == 1, "a trial returns one number: one model"
    assert cfg.cv.objective in cfg.cv.metrics
    model = cfg.cv.models[0]
    params = dict(sweeper.params)
    assert params
    for key, space in params.items():
        assert key.startswith(f"model.{model}."), f"{key} is not a knob of {model}"
        assert OmegaConf.select(cfg, key, default=MISSING) is not MISSING, (
            f"{name} searches {key}, which conf/ does not have (renamed?)"
        )
        override = OverridesParser.create().parse_override(f"{key}={space}")
        assert override.is_sweep_override(), f"{key}: {space} is not a search space"


@pytest.mark.parametrize("name", SEARCHES)
def test_every_trial_writes_its_own_folders(name: str) -> None:
    cfg = compose_search(name)
    for key in ("cv.out_dir", "cv.work_dir", "train.embedding_cache.dir"):
        parent, leaf = key.rsplit(".", 1)
        value = OmegaConf.to_container(OmegaConf.select(cfg, parent), resolve=False)[leaf]
        assert value.startswith("${hydra:runtime.output_dir}/"), key


def test_params_yaml_holds_no_search() -> None:
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    assert "hydra" not in params and "hparams_search" not in params
    assert params["cv"]["objective"] in params["cv"]["metrics"]


def test_summary_has_validation_means_only_for_runs_with_val() -> None:
    runs = [{"auc": 0.6, "val": {"auc": 0.8}}, {"auc": 0.7, "val": {"auc": 0.6}}]
    summary = summarise(runs, ["auc"])
    assert summary["auc_mean"] == pytest.approx(0.65)
    assert summary["val_auc_mean"] == pytest.approx(0.7)
    assert "val_auc_mean" not in summarise([{"auc": 0.6}], ["auc"])


def test_objective_is_one_models_mean_validation_metric() -> None:
    cfg = OmegaConf.create({"cv": {"objective": "auc"}})
    assert objective(cfg, {"cnn": {"val_auc_mean": 0.8, "auc_mean": 0.6}}) == 0.8
    assert objective(cfg, {"cnn": {"val_auc_mean": 0.8}, "vgg16": {"val_auc_mean": 0.7}}) is None
    with pytest.raises(ValueError, match="undefined in every fold"):
        objective(cfg, {"cnn": {"val_auc_mean": None}})


def scratch_project(root: Path) -> Path:
    """``root`` as a project of its own (dvc.yaml, this checkout's conf/), so a run there finds
    its config and keeps its outputs there."""
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "conf").symlink_to(CONF_DIR)
    return root


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-trial Optuna sweep of the CNN on the synthetic set, run as a user would."""
    from pox_pipeline.common.config import compose as compose_params
    from pox_pipeline.data.synthetic import synthesize

    root = scratch_project(tmp_path_factory.mktemp("sweep"))
    synthetic = [
        f"synthetic.out_dir={root}/synthetic", "synthetic.image_size=64",
        "synthetic.patients_per_class=8",
    ]  # fmt: skip
    synthesize(compose_params(synthetic))
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")}  # this checkout's package
    command = [
        sys.executable, "-m", "pox_pipeline.training.cv", "-m", "hparams_search=cnn_optuna",
        *synthetic, *TINY, f"hydra.sweeper.n_trials={N_TRIALS}", f"hydra.sweep.dir={root}/sweep",
        f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return root / "sweep"


def test_sweep_trials_sample_different_params(tiny_sweep: Path) -> None:
    searched = dict(compose_search("cnn_optuna").hydra.sweeper.params)
    sampled = []
    for trial in range(N_TRIALS):
        overrides = yaml.safe_load((tiny_sweep / str(trial) / ".hydra/overrides.yaml").read_text())
        values = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides}
        assert set(searched) <= set(values)
        sampled.append(tuple(values[key] for key in searched))
    assert len(set(sampled)) == N_TRIALS


def test_sweep_best_value_is_the_best_mean_validation_objective(tiny_sweep: Path) -> None:
    results = yaml.safe_load((tiny_sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == set(compose_search("cnn_optuna").hydra.sweeper.params)
    objectives = []
    for trial in range(N_TRIALS):
        summary = json.loads((tiny_sweep / str(trial) / "cv" / "summary.json").read_text())
        assert [run["fold"] for run in summary["runs"]["cnn"]] == [0, 1]
        assert all("auc" in run["val"] for run in summary["runs"]["cnn"])
        objectives.append(summary["summaries"]["cnn"]["val_auc_mean"])
    assert results["best_value"] == pytest.approx(max(objectives))


def test_a_sweep_over_several_models_stops_before_training(tmp_path: Path) -> None:
    """Which model's objective would a trial return? None: the sweep refuses at once."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")}
    result = subprocess.run(
        [sys.executable, "-m", "pox_pipeline.training.cv", "-m", "hparams_search=cnn_optuna",
         "cv.models=[cnn,vgg16]", "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path}/sweep",
         f"synthetic.out_dir={tmp_path}/missing"],
        cwd=scratch_project(tmp_path), env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "set cv.models=[<model>]" in result.stdout + result.stderr
