"""``pox validate``'s verdict on plain score arrays (no model): not fit when the AUC's interval
reaches chance or the site threshold's specificity is below the floor, and then no threshold to
apply; fit with the threshold it recommends; the ROC figure's title inside the figure."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from pox_pipeline.ops import validate as site
from pox_pipeline.serving.policy import DecisionPolicy
from pox_pipeline.training.evaluate import plot_curve, plot_reliability

CLASSES = ("Monkeypox", "Others")
MODEL = "pox-classifier:6moeqtho7otxwax4"  # a BentoML tag as long as the real ones
TARGET = 0.9


@pytest.fixture
def cfg(make_cfg: Callable[..., DictConfig]) -> DictConfig:
    return make_cfg("evaluate.bootstrap.samples=200")  # intervals stable enough, and fast


def policy() -> DecisionPolicy:
    name, version = MODEL.split(":")
    metadata = {"classes": list(CLASSES), "positive_class": CLASSES[0], "threshold": 0.5,
                "image_size": 32, "resample": "bilinear"}  # fmt: skip
    return DecisionPolicy.from_metadata(name, version, metadata)


def run(
    cfg: DictConfig, folder: Path, positives: np.ndarray, negatives: np.ndarray,
    folders: tuple[str, str] = CLASSES,
) -> dict:  # fmt: skip
    """validate() on photos scored P(Monkeypox) = the given values, none refused."""
    probability = np.concatenate([positives, negatives])
    labels = [0] * len(positives) + [1] * len(negatives)
    photos = [site.LabelledPhoto(folder / folders[label] / f"{n}.png", label)
              for n, label in enumerate(labels)]  # fmt: skip
    scored = np.column_stack([probability, np.zeros_like(probability)])  # guard score 0: accepted
    return site.validate(cfg, policy(), photos, scored, TARGET, folder)


def low_specificity_scores() -> tuple[np.ndarray, np.ndarray]:
    """A model that ranks well (AUC 0.91) but misses 4 of 30 positives low: the threshold that
    keeps 90% sensitivity sits at 0.2, above only 10 of the 30 negatives (specificity 1/3)."""
    positives = np.r_[np.full(26, 0.95), np.full(4, 0.2)]
    negatives = np.r_[np.linspace(0.3, 0.6, 20), np.linspace(0.0, 0.15, 10)]
    return positives, negatives


def retrain(folder: Path, class_map: str = "") -> str:
    source = f"{{dir: {folder.resolve()}, group_pattern: null{class_map}}}"
    return f"dvc exp run -S data=msld_msid -S '+data.sources.site={source}'"


def test_scores_at_chance_are_not_fit_and_no_threshold_is_recommended(
    cfg: DictConfig, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    report = run(cfg, tmp_path / "site", rng.uniform(size=30), rng.uniform(size=30))
    assert report["at_served_threshold"]["auc_ci_low"] <= 0.5  # the case under test
    verdict = report["verdict"]
    assert verdict["fit"] is False and site.AUC_REACHES_CHANCE in verdict["reasons"]
    assert site.exit_status(report) == site.EXIT_NOT_FIT == 1
    assert "recommended" not in report and "threshold" in report["not_recommended"]
    assert report["retrain"]["command"] == retrain(tmp_path / "site")
    text = "\n".join(verdict["text"])
    assert text.startswith("Verdict: NOT FIT for this site, and a threshold cannot fix it:")
    assert "the interval reaches 0.5" in text and "no threshold_override.yaml" in text
    assert f"  {retrain(tmp_path / 'site')}\n" in text
    assert "`dvc metrics show`" in text and "model card" in text


def test_a_threshold_with_specificity_below_the_floor_is_not_fit(
    cfg: DictConfig, tmp_path: Path
) -> None:
    report = run(cfg, tmp_path, *low_specificity_scores(), folders=("monkeypox", "others"))
    assert report["at_served_threshold"]["auc_ci_low"] > 0.5  # it ranks well: only the floor
    assert report["verdict"]["fit"] is False
    assert report["verdict"]["reasons"] == [site.SPECIFICITY_BELOW_FLOOR]
    rejected = report["not_recommended"]
    assert rejected["threshold"] == pytest.approx(0.2)
    assert rejected["specificity"] == pytest.approx(1 / 3)
    text = "\n".join(report["verdict"]["text"])
    assert "below the floor of 0.5 (validate.min_specificity)" in text
    assert "flags 67% of the photos without Monkeypox" in text
    assert "apply" not in text.lower()
    # class folders named in another case: the collection maps them to the model's classes
    class_map = ", class_map: {monkeypox: Monkeypox, others: Others}"
    assert report["retrain"]["command"] == retrain(tmp_path, class_map)


def test_the_specificity_floor_is_a_setting(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    lenient = make_cfg("evaluate.bootstrap.samples=200", "validate.min_specificity=0.3")
    report = run(lenient, tmp_path, *low_specificity_scores())
    assert report["verdict"]["fit"] is True and report["recommended"]["threshold"] == 0.2
    with pytest.raises(ValueError, match="validate.min_specificity"):
        site.VerdictSettings.from_cfg(make_cfg("validate.min_specificity=1.5"))


def test_a_model_that_separates_the_site_is_fit_at_the_recommended_threshold(
    cfg: DictConfig, tmp_path: Path
) -> None:
    rng = np.random.default_rng(1)
    positives = np.clip(rng.normal(0.75, 0.1, 30), 0, 1)
    negatives = np.clip(rng.normal(0.25, 0.1, 30), 0, 1)
    report = run(cfg, tmp_path, positives, negatives)
    assert report["verdict"] == {**report["verdict"], "fit": True, "reasons": []}
    assert site.exit_status(report) == site.EXIT_FIT == 0
    recommended = report["recommended"]
    assert "not_recommended" not in report and "retrain" not in report
    first, *rest = report["verdict"]["text"]
    assert first.startswith(
        f"Verdict: fit for this site at threshold {recommended['threshold']:.6f}: sensitivity "
        f"{recommended['sensitivity']:.3f} ["
    )
    assert f"specificity {recommended['specificity']:.3f} [" in first
    assert rest == ["Apply it with:", f"  {site.apply_command(recommended['threshold'])}"]


def test_photos_of_one_class_give_no_verdict(cfg: DictConfig, tmp_path: Path) -> None:
    report = run(cfg, tmp_path, np.linspace(0.1, 0.9, 10), np.array([]))
    assert report["verdict"]["fit"] is None and site.exit_status(report) == 2
    assert "recommended" not in report and "not_recommended" not in report
    assert report["verdict"]["text"][0].startswith("Verdict: none.")


def test_the_override_file_is_written_only_for_a_fit_model(
    cfg: DictConfig, tmp_path: Path
) -> None:
    """A fit run writes it; a not-fit run into the same folder removes it (ready to apply, it
    would read as advice) and says why in the JSON and the HTML page."""
    out = tmp_path / "report"
    fit = run(cfg, tmp_path / "site", np.linspace(0.6, 0.9, 20), np.linspace(0.1, 0.4, 20))
    written = site.write_report(fit, out, 10)
    override = yaml.safe_load((out / site.OVERRIDE_FILE).read_text())
    assert out / site.OVERRIDE_FILE in written
    assert override["serve"]["threshold_override"] == pytest.approx(fit["recommended"]["threshold"])

    unfit = run(cfg, tmp_path / "site", *low_specificity_scores())
    written = site.write_report(unfit, out, 10)
    assert not (out / site.OVERRIDE_FILE).exists() and out / site.OVERRIDE_FILE not in written
    report = json.loads((out / site.REPORT_JSON).read_text())
    assert report["verdict"]["fit"] is False
    assert report["verdict"]["reasons"] == ["specificity_below_floor"]
    assert report["verdict"]["min_specificity"] == 0.5
    assert report["retrain"] == {"data": "msld_msid", "collection": "site",
                                 "command": retrain(tmp_path / "site")}  # fmt: skip
    assert "recommended" not in report and report["not_recommended"]["threshold"] == 0.2
    page = (out / site.REPORT_HTML).read_text()
    assert "Verdict: NOT FIT for this site" in page and "threshold_override=" not in page
    assert "+data.sources.site={dir: " in page  # the command, HTML-escaped quotes aside


@pytest.mark.parametrize(
    "name",
    ["site", "it's a site", 'the "C" clinic', "{a}, b=c: d", "${x}", "tail\\", 'b\\"q', "café"],
)
def test_the_retrain_command_survives_the_shell_and_hydra(name: str, tmp_path: Path) -> None:
    """Whatever the folder's name, and with a class folder named in another case: the printed
    command, split by a shell, gives DVC an override that Hydra (then OmegaConf) reads back as
    the folder, with a class map of every class folder."""
    folder = tmp_path / name
    settings = site.VerdictSettings(0.5, "msld_msid", "clinic_c")
    command = site.retrain_command(folder, settings, {"monkeypox": "Monkeypox", "Others": "Others"})
    argv = shlex.split(command)
    assert argv[:6] == ["dvc", "exp", "run", "-S", "data=msld_msid", "-S"]
    override = OverridesParser.create().parse_override(argv[6])
    assert override.key_or_group == "data.sources.clinic_c"
    source = OmegaConf.to_container(OmegaConf.create({"source": override.value()}), resolve=True)
    class_map = {"Others": "Others", "monkeypox": "Monkeypox"}
    assert source["source"] == {"dir": str(folder.resolve()), "group_pattern": None,
                                "class_map": class_map}  # fmt: skip


def title_inside(fig: Figure) -> bool:
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    title = fig.axes[0].title
    extent, frame = title.get_window_extent(), fig.bbox
    return bool(title.get_text()) and (
        frame.x0 <= extent.x0 and extent.x1 <= frame.x1
        and frame.y0 <= extent.y0 and extent.y1 <= frame.y1
    )  # fmt: skip


@pytest.mark.parametrize(
    "title",
    [
        f"{MODEL}\nROC on this site's photos",  # pox validate's
        f"{MODEL}: ROC on this site's photos",  # cut off at both ends before titles wrapped
        "efficientnet_lite0: precision-recall, test (ROC AUC 0.913)",  # evaluate's
    ],
)
def test_a_long_title_stays_inside_the_figure(title: str, tmp_path: Path) -> None:
    x = pd.Series(np.linspace(0, 1, 5))
    roc = plot_curve(x, x, ("false positive rate", "sensitivity"), title, tmp_path / "roc.png",
                     diagonal=True)  # fmt: skip
    assert title_inside(roc)
    bins = pd.DataFrame({"confidence": [0.2, 0.8], "frequency": [0.3, 0.7], "count": [5, 5]})
    reliability = plot_reliability({"served": bins}, ("confidence", "frequency"), title,
                                   tmp_path / "reliability.png")  # fmt: skip
    assert title_inside(reliability)
