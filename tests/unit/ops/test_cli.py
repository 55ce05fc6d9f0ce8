"""The ``pox`` command line, run as users run it: a subprocess, against the test BentoML
store (conftest's BENTOML_HOME) and a params file named by POX_PARAMS."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers.serve import (
    coloured_pixels,
    grey_photo_with_spot,
    save_champion,
    save_png,
    skin_like_photos,
    write_serve_params,
)
from pox_pipeline.common.params import project_root
from pox_pipeline.ops import cli

TIMEOUT_S = 240  # TensorFlow's import on a busy 2-core machine


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A guarded champion, a params file and a folder of photos: two like the guard's
    reference, a flat blue square, and a text file that is no photo."""
    photos = skin_like_photos(24)
    tag = save_champion(guard_photos=photos)
    root = tmp_path_factory.mktemp("cli")
    params = write_serve_params(root / "params.yaml")
    folder = root / "photos"
    (folder / "nested").mkdir(parents=True)
    save_png(folder / "skin_a.png", photos[0])
    save_png(folder / "nested" / "skin_b.png", photos[1])
    save_png(folder / "blue.png", np.tile(np.array([30.0, 60.0, 220.0]), (32, 32, 1)))
    (folder / "notes.txt").write_text("not a photo")
    yield {"tag": tag, "root": root, "params": params, "folder": folder}


def pox(project: dict, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "POX_PARAMS": str(project["params"]), "BENTOML_DO_NOT_TRACK": "true"}
    return subprocess.run(
        [sys.executable, "-m", "pox_pipeline.ops.cli", *args], cwd=cwd or project["root"], env=env,
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip


def test_pyproject_declares_the_pox_script() -> None:
    declared = tomllib.loads((project_root() / "pyproject.toml").read_text())["project"]
    assert declared["scripts"]["pox"] == "pox_pipeline.ops.cli:main"
    assert any(dep.startswith("click") for dep in declared["dependencies"])


def test_every_command_has_help() -> None:
    runner = CliRunner()
    top = runner.invoke(cli.main, ["--help"])
    assert top.exit_code == 0
    for command in ("predict", "explain", "doctor", "model-card"):
        assert command in top.output
        sub = runner.invoke(cli.main, [command, "--help"])
        assert sub.exit_code == 0 and "Usage:" in sub.output
    assert "--model" in runner.invoke(cli.main, ["predict", "--help"]).output


def test_predict_answers_every_readable_file_then_fails_for_the_unreadable(project: dict) -> None:
    folder = project["folder"]
    result = pox(project, "predict", "--json", str(folder / "*.png"), str(folder / "nested"),
                 str(folder / "notes.txt"))  # fmt: skip
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    by_name = {Path(line["file"]).name: line for line in lines}
    assert set(by_name) == {"skin_a.png", "skin_b.png", "blue.png", "notes.txt"}
    assert "not an image" in by_name["notes.txt"]["error"]
    for name in ("skin_a.png", "skin_b.png", "blue.png"):
        answer = by_name[name]
        assert answer["threshold"] == 0.5
        assert answer["model"]["version"] == project["tag"].split(":")[1]
    skin, blue = by_name["skin_a.png"], by_name["blue.png"]
    assert skin["in_distribution"] is True
    assert skin["label"] in ("Monkeypox", "Others") and 0 <= skin["probability"] <= 1
    # the guard rejects the blue square: no label, no probability, the guard's score and why
    assert blue["in_distribution"] is False and blue["ood"]["checked"] is True
    assert blue["label"] is None and blue["probability"] is None and blue["probabilities"] is None
    assert blue["ood"]["score"] > 1 and blue["ood_reason"] in blue["explanation"]
    assert "does not look like a skin photo" in blue["ood_reason"]
    assert "1 of 4 files could not be read" in result.stderr


def test_predict_text_says_why_the_label(project: dict) -> None:
    result = pox(
        project,
        "predict",
        str(project["folder"] / "skin_a.png"),
        str(project["folder"] / "blue.png"),
    )
    assert result.returncode == 0, result.stderr
    skin, blue = result.stdout.splitlines()
    assert "in distribution" in skin and "screening threshold of 50%" in skin
    assert "caught 95% of Monkeypox cases" in skin and "false alarms on 40%" in skin
    assert "not assessed" in blue and "does not look like a skin photo" in blue


def test_explain_writes_the_services_overlay(project: dict) -> None:
    """The overlay is the photo itself under a partial tint (not a blank or the model's small
    input stretched back), the tint where Grad-CAM says, as the service draws it."""
    import bentoml

    from pox_pipeline.common import preprocess
    from pox_pipeline.common.params import load_params
    from pox_pipeline.serving.predictor import Predictor, render_heatmap
    from pox_pipeline.serving.settings import ServeConfig

    out = project["root"] / "overlay.png"
    source = project["root"] / "grey.png"  # achromatic and textured: any colour is the tint
    source.write_bytes(grey_photo_with_spot(size=(120, 90), grain=30))
    stored = bentoml.models.get(project["tag"])
    # --model also takes a model folder
    result = pox(project, "explain", str(source), "--out", str(out), "--model", stored.path)
    assert result.returncode == 0, result.stderr
    assert f"overlay written to {out}" in result.stdout
    settings = ServeConfig.from_cfg(load_params(project["params"]).serve)
    # the photo as the service decodes it: shrunk toward the model's input (120x90 -> 60x45
    # for this 32-px model), as a JPEG is by DCT scaling
    photo = preprocess.decode_image(source.read_bytes(), draft=bentoml.models.get(
        project["tag"]).info.metadata["image_size"], **settings.decode_limits())
    assert photo.size == (60, 45)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == photo.size
        overlay = np.asarray(image.convert("RGB"), np.float32)
    pixels = np.asarray(photo, np.float32)
    heatmap = settings.heatmap
    # each pixel is (1 - w) * photo + w * colour with w <= alpha: the photo shows through ...
    assert np.abs(overlay - pixels).max() <= heatmap.alpha * 255 + 1
    shade = np.corrcoef(overlay.mean(axis=-1).ravel(), pixels.mean(axis=-1).ravel())[0, 1]
    assert shade > 0.5, f"the overlay's shading follows the photo's only {shade:.2f}"
    # ... and the tint is there (the photo has no colour at all) ...
    assert coloured_pixels(out.read_bytes()) > 0
    # ... where the model's Grad-CAM of this photo puts it, as the service renders it
    predictor = Predictor.from_stored(stored)
    cam = predictor.gradcam(preprocess.to_model_input(photo, predictor.policy.image_size))
    expected = Image.open(io.BytesIO(render_heatmap(photo, cam, heatmap)))
    assert np.abs(np.asarray(expected, np.float32) - overlay).max() <= 1


def test_model_card_is_written(project: dict) -> None:
    out = project["root"] / "card.html"
    result = pox(project, "model-card", "--out", str(out))
    assert result.returncode == 0, result.stderr
    html = out.read_text()
    expected = (
        "Intended use",
        "not a diagnosis",
        "Operating threshold",
        "Out-of-distribution rule",
        "Known limits",
        "caught 95% of Monkeypox cases",
    )
    for words in expected:
        assert words.lower() in html.lower()


def test_doctor_reports_each_need_with_its_fix(project: dict) -> None:
    result = pox(project, "doctor", cwd=project_root())
    lines = result.stdout
    for name in ("python", "tensorflow", "EfficientNet-Lite0 weights", "project (dvc.yaml)",
                 "params.yaml", "MSLD data", "MLflow database", "champion in BentoML",
                 "Chromium"):  # fmt: skip
        assert name in lines
    assert "ok      champion in BentoML" in lines  # the fixture's model
    assert result.returncode == (0 if "MISSING" not in lines else 1)
    # outside the project: said, with the fix, and the pipeline cannot run from there
    outside = pox(project, "doctor")
    assert "MISSING project (dvc.yaml)" in outside.stdout
    assert "fix: run pox inside the project" in outside.stdout and outside.returncode == 1


def test_an_unpublished_model_says_what_select_would_publish(make_cfg, tmp_path: Path) -> None:
    """--model models/<name>: the same metadata select builds (architecture and initial
    weights from the folder's run.json, calibration, the training data and split), so its card
    differs from the published one only by what publishing adds (guard, backends, registry)."""
    from pox_pipeline.serving import model_card

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "README.md").write_text("Lesion photos of 12 patients, CC BY 4.0.")
    cfg = make_cfg(f"data.raw_dir={raw}")
    model_dir = tmp_path / "models" / "cnn"
    model_dir.mkdir(parents=True)
    (model_dir / "run.json").write_text(json.dumps({"architecture": "cnn: 3 conv blocks",
                                                    "weights": None}))  # fmt: skip
    eval_dir = Path(cfg.paths.reports_dir) / "eval" / "cnn"
    eval_dir.mkdir(parents=True)
    (eval_dir / "selection_metrics.json").write_text(json.dumps(
        {"threshold": 0.4, "threshold_rule": "fixed", "calibration": "temperature",
         "temperature": 1.3, "tta": "flips"}))  # fmt: skip

    metadata = cli.pipeline_model(model_dir, cfg).metadata
    assert (metadata["architecture"], metadata["weights"]) == ("cnn: 3 conv blocks", "none")
    assert (metadata["calibration"], metadata["temperature"]) == ("temperature", 1.3)
    assert metadata["training_data"] == {"source": str(raw),
                                         "notes": "Lesion photos of 12 patients, CC BY 4.0."}
    assert metadata["split"]["group_pattern"] == cfg.data.group_pattern
    card = model_card.render("cnn", metadata)
    assert "| architecture | cnn: 3 conv blocks |" in card and "CC BY 4.0" in card


def test_a_trained_unpublished_model_folder_answers_unchecked(project: dict) -> None:
    """--model models/<name>: the metadata select would ship, from params.yaml and the
    model's evaluation; no guard was fitted, and the answer says so."""
    from helpers.models import tiny_model

    root = project["root"] / "pipeline"
    (root / "models" / "cnn").mkdir(parents=True)
    tiny_model().save(root / "models" / "cnn" / "model.keras")
    (root / "reports" / "eval" / "cnn").mkdir(parents=True)
    val = {"threshold": 0.4, "threshold_rule": "fixed", "temperature": 1.0, "tta": "none",
           "sensitivity": 0.9, "specificity": 0.5}  # fmt: skip
    (root / "reports" / "eval" / "cnn" / "selection_metrics.json").write_text(json.dumps(val))
    params = write_serve_params(root / "params.yaml", f"paths.reports_dir={root / 'reports'}",
                                "data.image_size=32")  # fmt: skip
    result = pox({**project, "params": params}, "predict", "--json", "--model",
                 str(root / "models" / "cnn"), str(project["folder"] / "skin_a.png"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["threshold"] == 0.4 and answer["model"] == {
        "name": "cnn", "version": "unpublished", "mlflow_run_id": None}  # fmt: skip
    assert answer["ood"] == {"checked": False} and answer["in_distribution"] is True
    assert "caught 90% of Monkeypox cases" in answer["explanation"]


def test_a_missing_model_is_a_clear_error(project: dict) -> None:
    result = pox(project, "predict", "--model", "no-such-model:latest", str(project["folder"]))
    assert result.returncode == 2
    assert "no model 'no-such-model:latest'" in result.stderr


def test_the_cli_serves_a_published_backend_from_its_stored_bytes(
    project: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve.backend=tflite_full_int8 works from the command line as in the service: the
    bytes published with the model run, and nothing is converted."""
    import bentoml

    from pox_pipeline.common.params import load_params
    from pox_pipeline.serving import tflite
    from pox_pipeline.serving.settings import ServeConfig

    tag = save_champion(guard_photos=skin_like_photos(24), backends=["tflite_full_int8"])
    stored_bytes = (Path(bentoml.models.get(tag).path) / "tflite_full_int8.tflite").read_bytes()
    monkeypatch.setattr(tflite, "convert", lambda *args: pytest.fail("the CLI converted"))
    params = load_params(write_serve_params(
        project["root"] / "int8.yaml", "serve.backend=tflite_full_int8",
    ))  # fmt: skip
    settings = ServeConfig.from_cfg(params.serve)
    predictor = cli.resolve_model(tag, params).predictor(settings)
    assert predictor.backend == "tflite_full_int8" and predictor.runner.flatbuffer == stored_bytes
    image = np.asarray(Image.open(project["folder"] / "skin_a.png").convert("RGB"), np.float32)
    [answer] = predictor.predict([image])
    source = cli.resolve_model(tag, params)
    keras_settings = dataclasses.replace(settings, backend="keras")
    keras_predictor = source.predictor(keras_settings)
    [expected] = keras_predictor.predict([image])
    assert answer["model"] == expected["model"]
    # the model's outputs, not the answers' probabilities: those are null for a photo the guard
    # rejects, and the int8 guard's verdict on this photo may differ from the float one's
    np.testing.assert_allclose(
        predictor.outputs(image[None]), keras_predictor.outputs(image[None]), atol=0.1
    )


def test_pox_monitor_exit_codes_never_make_an_error_read_as_drift(tmp_path: Path) -> None:
    """0: no drift or not enough answers; 2: any error, with the reason (1 is drift alone, as
    test_monitor.py shows on a served model). Run as cron runs it: a subprocess."""
    params = write_serve_params(tmp_path / "params.yaml")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    def monitor(*args: str, params_file: Path = params) -> subprocess.CompletedProcess:
        return pox({"params": params_file, "root": tmp_path}, "monitor", *args)

    empty = monitor()
    assert empty.returncode == 0 and "not enough answers" in empty.stdout, empty.stderr
    assert (tmp_path / "monitoring" / "reports" / "drift.json").is_file()  # the project root's
    failures = {
        "bad window": (monitor("--since", "7x"), "'7x': write a number"),
        "unwritable reports": (monitor("--out", str(blocker / "reports")), "Not a directory"),
        "missing --dir": (monitor("--dir", str(tmp_path / "missing")), "does not exist"),
        "bad setting": (monitor(params_file=write_serve_params(
            tmp_path / "bad.yaml", "serve.monitoring.timestamp_resolution=7m")), "divides a day"),
        "no params": (monitor(params_file=tmp_path / "absent.yaml"), "absent.yaml not found"),
    }  # fmt: skip
    for case, (result, reason) in failures.items():
        assert result.returncode == 2 and reason in result.stderr, (case, result.stderr)
