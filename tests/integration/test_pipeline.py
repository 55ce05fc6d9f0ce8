"""The whole DVC pipeline, end to end, in a throw-away copy of the project at tiny settings:
`dvc repro` runs every stage, a second `dvc repro` does nothing, and `dvc exp run -S` on a
CNN param re-runs only the CNN stages (and select)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import bentoml
import pytest

from helpers.dvc import copy_project, run, stages_run
from pox_pipeline.common.config import write_params
from pox_pipeline.common.params import project_root

pytestmark = pytest.mark.long  # minutes in all: `make test` starts this file early

PROJECT_ROOT = project_root()

# Three of the five families (the tutorial CNN, the statistics model, the ImageNet champion's
# family, its faster lite0 backbone) keep the suite's time: every stage of every model is the
# same module run by dvc.yaml's foreach, and test_dvc_stages checks every model's deps/params.
MODELS = ("cnn", "colour_texture", "efficientnet_lite")
# Tiny settings, passed to DVC's own Hydra composition as -S overrides.
TINY = [
    f"models=[{','.join(MODELS)}]",
    "data.image_size=32",
    "model.cnn.padding=same",
    "synthetic.image_size=48",
    "synthetic.patients_per_class=6",
    "model.cnn.epochs=1",
    "model.vgg16.epochs=1",
    "model.resnet.epochs=1",
    "model.resnet.input_size=null",
    "model.colour_texture.epochs=1",
    "model.colour_texture.input_size=null",
    "model.efficientnet_lite.epochs=1",
    "model.efficientnet_lite.augment.cached_copies=1",
    "model.efficientnet_lite.variant=lite0",
    "evaluate.bootstrap.samples=50",
    "train.refit.folds=3",  # the k-fold + refit protocol at its smallest: 4 fits a model, not 6
]
COPIED = ["conf", "src", "dvc.yaml", ".dvcignore", ".gitignore"]


def _run(cmd: list[str], cwd: Path) -> str:
    """``cmd`` with this interpreter's environment first on PATH (dvc, python)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return run(cmd, cwd, env)


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("project")
    copy_project(PROJECT_ROOT, COPIED, root)
    write_params(root / "params.yaml", overrides=TINY, conf_dir=root / "conf")
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q"], root)
    _run(["dvc", "config", "hydra.enabled", "true"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], root)
    return root


def test_dvc_repro_runs_every_stage_then_nothing(project_copy: Path) -> None:
    first = _run(["dvc", "repro"], project_copy)
    assert stages_run(first) == {
        "synthesize", "prepare", *(f"{stage}@{name}" for stage in ("train", "evaluate",
                                                                    "crosscheck")
                                    for name in MODELS), "select",
    }  # fmt: skip
    reports = project_copy / "reports"
    compared = {}
    for name in MODELS:
        assert (project_copy / "models" / name / "model.keras").is_file()
        compared[name] = json.loads((reports / "eval" / name / "metrics.json").read_text())
        test = json.loads((reports / "eval" / name / "test_metrics.json").read_text())
        assert compared[name]["test"] == {m: test[m] for m in compared[name]["test"]}
    selected = json.loads((reports / "select.json").read_text())
    metric = selected["metric"]
    winner = selected["candidates"][selected["winner"]]
    best = max(selected["candidates"].values(), key=lambda c: c["mean"])
    # the one-SE rule: the winner is within one standard error of the best mean over folds
    assert winner["eligible"] and selected["value"] == winner["mean"]
    assert best["mean"] - winner["mean"] <= best["se"]
    assert winner["pooled"] == compared[selected["winner"]]["val"][metric]
    champion = json.loads((reports / "champion.json").read_text())
    assert champion == {"champion": selected["winner"], **compared[selected["winner"]]}
    # refitted on every non-test photo: its monitoring reference holds out-of-fold answers
    stored = bentoml.models.get(selected["bentoml_tag"]).info.metadata
    assert stored["monitoring"]["reference_answers"] == "out_of_fold"

    second = _run(["dvc", "repro"], project_copy)
    assert stages_run(second) == set()
    assert "up to date" in second.lower()

    # `dvc metrics show`: the compared figures of each model and the champion, nothing else,
    # and no complaint about an optional file (reports/cv/metrics.json) that is not there
    shown = _run(["dvc", "metrics", "show", "--json"], project_copy)
    assert "failed to load" not in shown
    [revision] = json.JSONDecoder().raw_decode(shown, shown.index("{"))[0].values()
    files = revision["data"]
    expected = {f"reports/{stage}/{m}/metrics.json" for m in MODELS
                for stage in ("eval", "crosscheck")} | {"reports/champion.json"}  # fmt: skip
    assert set(files) == expected
    assert not any("error" in result for result in files.values())

    # `dvc plots show`: every stage's plots, with the axes dvc.yaml gives them, load
    plotted = _run(["dvc", "plots", "show"], project_copy)
    assert "failed to load" not in plotted
    page = (project_copy / "dvc_plots" / "index.html").read_text()
    for name in MODELS:
        for plot in (f"reports/eval/{name}/roc.csv", f"reports/train/{name}/history.csv"):
            assert plot in page
    assert '"fpr"' in page and '"precision"' in page and '"predicted"' in page


def test_changing_a_cnn_param_reruns_only_cnn_stages(project_copy: Path) -> None:
    changed = [o.replace("model.cnn.epochs=1", "model.cnn.epochs=2") for o in TINY]
    output = _run(["dvc", "exp", "run", *(a for o in changed for a in ("-S", o))], project_copy)
    assert stages_run(output) == {"train@cnn", "evaluate@cnn", "crosscheck@cnn", "select"}
