"""``pox validate``: a site's labelled photos through the service's own path, the figures it
promises, and the threshold override that the CLI and the real service then honour."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import bentoml
import numpy as np
import pytest
import requests
import yaml

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
from pox_pipeline.ops.validate import OVERRIDE_FILE, REPORT_HTML, REPORT_JSON
from pox_pipeline.serving.predictor import Predictor

TIMEOUT_S = 240


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A guarded tiny champion and a site folder: 12 photos per class, plus a flat colour the
    guard refuses and a broken file."""
    photos = skin_like_photos(40, seed=3)
    tag = save_champion(guard_photos=photos[:24])
    root = tmp_path_factory.mktemp("site")
    folder = root / "photos"
    for index, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True)
        for number, pixels in enumerate(photos[24 + 8 * index : 32 + 8 * index]):
            save_png(folder / name / f"p{number}.png", pixels)
    save_png(folder / CLASSES[1] / "flat.png", np.full((32, 32, 3), [20.0, 200.0, 40.0]))
    (folder / CLASSES[0] / "broken.png").write_bytes(b"not a png")
    params = write_serve_params(root / "params.yaml")
    yield {"tag": tag, "root": root, "folder": folder, "params": params}


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
    assert result.returncode == 0, result.stderr
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
    override = yaml.safe_load((out / OVERRIDE_FILE).read_text())
    assert override["serve"]["threshold_override"] == pytest.approx(recommended["threshold"])
    html = (out / REPORT_HTML).read_text()
    assert "data:image/png;base64," in html and "threshold_override" in html
    assert (out / "roc.png").stat().st_size > 0 and (out / "reliability.png").stat().st_size > 0


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
