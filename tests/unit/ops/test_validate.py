"""``pox validate``: a site's labelled photos through the service's own path, the figures it
promises, its verdict and exit status, and the threshold override that the CLI and the real
service then honour."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import bentoml
import numpy as np
import pytest
import requests
import yaml
from click.testing import CliRunner

from helpers.serve import (
    CLASSES,
    THRESHOLD,
    running_service,
    save_champion,
    save_png,
    skin_like_photos,
    write_serve_params,
)
from pox_pipeline.common import preprocess
from pox_pipeline.ops.cli import main
from pox_pipeline.ops.validate import EXIT_NOT_FIT, OVERRIDE_FILE, REPORT_HTML, REPORT_JSON
from pox_pipeline.serving.predictor import Predictor

TIMEOUT_S = 240


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A guarded tiny champion and two site folders of the same 16 photos, labelled by the
    champion's own ranking of those the guard accepts: ``fit`` (the top half Monkeypox: it
    separates them) and ``chance`` (the labels alternate in pairs down the ranking: AUC 0.5).
    The refused ones are Others; each folder also holds a flat colour the guard refuses and
    (``fit``) a broken file."""
    photos = skin_like_photos(40, seed=3)
    tag = save_champion(guard_photos=photos[:24])
    root = tmp_path_factory.mktemp("site")
    (root / "pool").mkdir()
    pool = [save_png(root / "pool" / f"p{n:02d}.png", pixels)
            for n, pixels in enumerate(photos[24:])]  # fmt: skip
    probability, ood_score = served_probabilities({"tag": tag}, pool)
    ranked = [pool[i] for i in np.argsort(-probability) if ood_score[i] <= 1]
    refused = [photo for photo, score in zip(pool, ood_score, strict=True) if score > 1]
    folders = {
        "fit": [rank < len(ranked) // 2 for rank in range(len(ranked))],
        "chance": [rank % 4 in (0, 3) for rank in range(len(ranked))],
    }
    for name, positive in folders.items():
        for label in CLASSES:
            (root / name / label).mkdir(parents=True)
        for photo, is_positive in zip(ranked + refused, positive + [False] * len(refused),
                                      strict=True):  # fmt: skip
            shutil.copy(photo, root / name / CLASSES[0 if is_positive else 1] / photo.name)
        save_png(root / name / CLASSES[1] / "flat.png", np.full((32, 32, 3), [20.0, 200.0, 40.0]))
    (root / "fit" / CLASSES[0] / "broken.png").write_bytes(b"not a png")
    params = write_serve_params(root / "params.yaml")
    yield {"tag": tag, "root": root, "folder": root / "fit", "chance": root / "chance",
           "params": params}  # fmt: skip


def pox(site: dict, *args: str, params: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "POX_PARAMS": str(params or site["params"])}
    return subprocess.run(
        [sys.executable, "-m", "pox_pipeline.ops.cli", *args], cwd=site["root"], env=env,
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip


def served_probabilities(site: dict, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """P(positive) and the OOD score of each photo, computed here through the Predictor."""
    predictor = Predictor.from_stored(bentoml.models.get(site["tag"]))
    inputs = np.stack([preprocess.preprocess_file(f, 32) for f in files])
    scored = predictor.outputs_with_ood_score(inputs)
    return predictor.policy.class_probabilities(scored[:, :-1])[:, 0], scored[:, -1]


def test_validate_reports_the_site_figures_and_recommends_a_threshold(site: dict) -> None:
    out = site["root"] / "report"
    result = pox(site, "validate", str(site["folder"]), "--out", str(out),
                 "--sensitivity-target", "0.75")  # fmt: skip
    assert result.returncode == 0, result.stderr  # fit
    assert "broken.png: error" in result.stderr  # reported, not fatal
    report = yaml.safe_load((out / REPORT_JSON).read_text())
    files = sorted((site["folder"] / CLASSES[0]).glob("p*.png"))
    negatives = sorted((site["folder"] / CLASSES[1]).glob("*.png"))
    probability, ood_score = served_probabilities(site, files + negatives)
    refused = ood_score > 1
    assert report["photos"] == 17 and report["refused"] == int(refused.sum())
    assert refused[-len(negatives):][0]  # flat.png sorts first among the negatives: refused
    labels = np.array([1] * len(files) + [0] * len(negatives))
    kept = ~refused
    at_served = report["at_served_threshold"]
    expected_sensitivity = np.mean(probability[kept & (labels == 1)] >= THRESHOLD)
    assert at_served["sensitivity"] == pytest.approx(expected_sensitivity)
    assert at_served["sensitivity_ci_low"] <= at_served["sensitivity"]
    recommended = report["recommended"]
    positives = probability[kept & (labels == 1)]
    assert np.mean(positives >= recommended["threshold"]) >= 0.75
    assert recommended["threshold"] in positives  # the highest threshold that keeps 75%
    assert report["verdict"]["fit"] is True
    assert (f"Verdict: fit for this site at threshold {recommended['threshold']:.6f}: "
            "sensitivity ") in result.stdout  # fmt: skip
    override = yaml.safe_load((out / OVERRIDE_FILE).read_text())
    assert override["serve"]["threshold_override"] == pytest.approx(recommended["threshold"])
    html = (out / REPORT_HTML).read_text()
    assert "data:image/png;base64," in html and "threshold_override" in html
    assert (out / "roc.png").stat().st_size > 0 and (out / "reliability.png").stat().st_size > 0


def test_a_model_at_chance_on_the_site_is_not_fit_and_its_threshold_is_not_written(
    site: dict, tmp_path: Path
) -> None:
    """Exit 1, the verdict and the retrain command printed, and no override file: not even an
    earlier run's, which would read as advice."""
    (tmp_path / OVERRIDE_FILE).write_text("serve:\n  threshold_override: 0.2\n")
    result = CliRunner().invoke(main, ["validate", str(site["chance"]), "--out", str(tmp_path)],
                                env={"POX_PARAMS": str(site["params"])})  # fmt: skip
    assert result.exit_code == EXIT_NOT_FIT == 1, result.output
    report = json.loads((tmp_path / REPORT_JSON).read_text())
    assert report["at_served_threshold"]["auc"] == pytest.approx(0.5, abs=0.1)
    assert report["verdict"]["fit"] is False and "recommended" not in report
    assert "Verdict: NOT FIT for this site, and a threshold cannot fix it:" in result.stdout
    source = f"{{dir: {site['chance'].resolve()}, group_pattern: null}}"
    assert f"dvc exp run -S data=msld_msid -S '+data.sources.site={source}'" in result.stdout
    assert not (tmp_path / OVERRIDE_FILE).exists()


def test_a_folder_that_names_no_class_is_a_clear_error(site: dict, tmp_path: Path) -> None:
    (tmp_path / "Cats").mkdir()
    result = pox(site, "validate", str(tmp_path))
    assert result.returncode == 2 and "name no class of the model" in result.stderr


def test_the_override_changes_the_served_threshold_in_the_cli_and_the_real_service(
    site: dict,
) -> None:
    """An override on the other side of a photo's probability from the published threshold
    flips its label,
    in ``pox predict`` and in the service; the served model card records it."""
    candidates = sorted((site["folder"] / CLASSES[0]).glob("p*.png"))
    probabilities, ood_scores = served_probabilities(site, candidates)
    closest = int(np.argmin(ood_scores))  # in distribution: it gets a label
    photo, probability = candidates[closest], probabilities[closest]
    assert ood_scores[closest] <= 1
    flagged = probability >= THRESHOLD
    override = (probability + 1) / 2 if flagged else probability / 2  # the other side of it
    params = write_serve_params(site["root"] / "override.yaml",
                                f"serve.threshold_override={override}")  # fmt: skip
    result = pox(site, "predict", "--json", str(photo), params=params)
    assert result.returncode == 0, result.stderr
    answer = yaml.safe_load(result.stdout)
    assert answer["threshold"] == pytest.approx(override)
    assert (answer["label"] == CLASSES[0]) is (not flagged)  # flipped
    with running_service(params, site["root"] / "server.log") as url:
        files = {"image": (photo.name, photo.read_bytes(), "image/png")}
        served = requests.post(f"{url}/predict", files=files, timeout=60).json()
        card = requests.get(f"{url}/model-card", timeout=60).text
    assert served["threshold"] == pytest.approx(override)
    assert served["label"] == answer["label"]
    assert "serve.threshold_override" in served["explanation"]
    assert "serve.threshold_override" in card
