"""Leave-one-collection-out: the left-out view keeps whole groups out of training, the stage
trains without each collection and scores it there, and a single collection is a no-op."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
from omegaconf import DictConfig
from PIL import Image, ImageEnhance

from pox_pipeline.common import paths
from pox_pipeline.data.prepare import MANIFEST_COLUMNS, prepare
from pox_pipeline.data.synthetic import synthesize
from pox_pipeline.release import crosscheck
from pox_pipeline.release.publish import without_nulls
from pox_pipeline.serving import model_card

pytestmark = pytest.mark.long  # trains a small CNN twice

FAST = ["model.cnn.padding=same", "model.cnn.epochs=2", "train.refit.folds=0",
        "train.verbose=0", "evaluate.tta=none"]  # fmt: skip


def _row(file: str, collection: str, group: str, split: str) -> dict[str, str]:
    return {"file": file, "source": f"/raw/{file}", "collection": collection,
            "class": "Monkeypox", "group": group, "split": split, "sha256": "0"}  # fmt: skip


def test_the_left_out_view_scores_one_collection_and_trains_on_the_rest(tmp_path: Path) -> None:
    prepared = tmp_path / "prepared"
    for split in ("train", "val", "test"):
        (prepared / split).mkdir(parents=True)
    rows = [
        _row("train/a1.png", "a", "a:1", "train"), _row("test/a2.png", "a", "a:2", "test"),
        _row("val/a3.png", "a", "a:3", "val"),
        # b's copy of a4's photo: their merged group reaches into b, so a4 never trains
        _row("train/a4.png", "a", "a:4+b:9", "train"), _row("val/b9.png", "b", "a:4+b:9", "val"),
        _row("train/b1.png", "b", "b:1", "train"),
    ]  # fmt: skip
    n_train = crosscheck.left_out_view(rows, "b", tmp_path / "view", prepared)
    with (tmp_path / "view" / "manifest.csv").open(newline="") as handle:
        view = {row["file"]: row["split"] for row in csv.DictReader(handle)}
    assert view == {"train/a1.png": "train", "test/a2.png": "test", "val/a3.png": "val",
                    "val/b9.png": "test", "train/b1.png": "test"}  # fmt: skip
    assert n_train == 2
    assert (tmp_path / "view" / "train").resolve() == (prepared / "train").resolve()


@pytest.fixture
def two_clinics(make_cfg: Callable[..., DictConfig], tmp_path: Path) -> DictConfig:
    """The synthetic set cut in two by patient; clinic_b's photos darker (another camera)."""
    cfg = make_cfg()
    synthesize(cfg)
    raw = Path(cfg.synthetic.out_dir)
    clinics = tmp_path / "clinics"
    for path in sorted(raw.rglob("*.png")):
        patient = int(path.stem.split("_")[0].lstrip("SNM"))
        clinic = "clinic_a" if patient % 2 else "clinic_b"
        target = clinics / clinic / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if clinic == "clinic_a":
            shutil.copy(path, target)
        else:
            ImageEnhance.Brightness(Image.open(path)).enhance(0.7).save(target)
    sources = ["+data.sources.clinic_a={dir: clinic_a}", "+data.sources.clinic_b={dir: clinic_b}"]
    cfg = make_cfg(f"data.raw_dir={clinics}", *sources, "crosscheck.models=[cnn]", *FAST)
    prepare(cfg)
    return cfg


def test_each_collection_is_scored_by_a_model_that_never_saw_it(two_clinics: DictConfig) -> None:
    report = crosscheck.crosscheck(two_clinics, "cnn")
    with (Path(two_clinics.paths.prepared_dir) / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    assert set(report["collections"]) == {"clinic_a", "clinic_b"}
    for name, figures in report["collections"].items():
        assert figures["n"] == sum(row["collection"] == name for row in rows)
        assert figures["n_train"] < len(rows) - figures["n"] + 1
        assert 0 <= figures["auc_ci_low"] <= figures["auc"] <= figures["auc_ci_high"] <= 1
        assert 0 < figures["threshold"] < 1
        assert set(figures["promised"]) == {"sensitivity", "specificity", "balanced_accuracy"}
        moved = figures["moved"]["sensitivity"]
        assert moved == pytest.approx(figures["sensitivity"] - figures["promised"]["sensitivity"],
                                      abs=1e-4)  # fmt: skip
        assert 0 <= figures["guard_refused"] <= 1
        (other,) = figures["on_training_collections"]  # its own collection's test photos
        assert figures["on_training_collections"][other]["n_test"] == sum(
            row["collection"] == other and row["split"] == "test" for row in rows
        )

    out = paths.crosscheck_dir(two_clinics, "cnn")
    assert json.loads((out / "crosscheck.json").read_text()) == json.loads(json.dumps(report))
    compared = json.loads((out / "metrics.json").read_text())
    assert set(compared) == {"clinic_a", "clinic_b"}
    assert set(compared["clinic_a"]) == set(crosscheck.COMPARED)

    mlflow.set_tracking_uri(two_clinics.mlflow.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[two_clinics.mlflow.experiment],
                              filter_string="tags.dvc_stage = 'crosscheck@cnn'")  # fmt: skip
    assert len(runs) == 1
    assert runs.iloc[0]["metrics.clinic_b_auc"] == pytest.approx(
        report["collections"]["clinic_b"]["auc"]
    )
    assert "clinic_a" in crosscheck.summary(report) and "never seen" in crosscheck.summary(report)

    figures = without_nulls({k: v for k, v in report.items() if k != "model_name"})
    card = model_card.render("pox", {**CARD_METADATA, "crosscheck": figures})
    section = card[card.index("On a collection it never saw"):]
    b = report["collections"]["clinic_b"]
    assert f"| clinic_b | {b['n']} | {b['auc']:.3f}" in section
    assert f"({b['promised']['specificity']:.1%})" in section


CARD_METADATA = {
    "classes": ["Monkeypox", "Others"], "positive_class": "Monkeypox", "threshold": 0.5,
    "image_size": 32, "resample": "bilinear",
}  # fmt: skip


def test_a_card_without_the_figures_says_they_were_not_measured() -> None:
    card = model_card.render("pox", {**CARD_METADATA, "crosscheck": {"note": "one collection: "
                                     "nothing to leave out", "collections": {}}})  # fmt: skip
    assert "Not measured: one collection: nothing to leave out" in card


def test_one_collection_has_nothing_to_leave_out(
    prepared_cfg: Callable[..., DictConfig],
) -> None:
    cfg = prepared_cfg()
    report = crosscheck.crosscheck(cfg, "cnn")
    assert report["collections"] == {} and "one collection" in report["note"]
    compared = paths.crosscheck_dir(cfg, "cnn") / "metrics.json"
    assert json.loads(compared.read_text()) == {}
