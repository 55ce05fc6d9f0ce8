"""Production monitoring (issue 21): records of a real server on 127.0.0.1, the drift tests on
them, the /metrics series, privacy of the files and their rotation."""

from __future__ import annotations

import io
import json
import time
from datetime import datetime, timedelta
from pathlib import Path

import bentoml
import numpy as np
import pytest
import requests
from click.testing import CliRunner
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from pox_pipeline import drift, monitor, non_skin
from pox_pipeline.cli import main as pox
from serve_helpers import (
    MODEL_NAME,
    running_service,
    save_champion,
    skin_like_photos,
    write_serve_params,
)

HELD_OUT = 30  # photos per case; the reference has the guard photos' last quarter (30)
UPLOAD_NAME = "patient-0042-lesion"  # a file name that must not reach the records
BATCH = 32  # serve.max_images_per_request


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def post_batch(url: str, photos: list[bytes]) -> list[dict]:
    answers = []
    for start in range(0, len(photos), BATCH):
        files = [("images", (f"{UPLOAD_NAME}-{start + i}.png", data, "image/png"))
                 for i, data in enumerate(photos[start : start + BATCH])]  # fmt: skip
        response = requests.post(f"{url}/predict_batch", files=files, timeout=120)
        assert response.status_code == 200, response.text
        answers += response.json()
    return answers


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """A monitored tiny champion served, and every case posted: held-out photos like the
    reference, the same darkened by 40 %, the same with a blue cast, the non-skin images;
    then one /explain, one /predict and one refused upload. Yields what each case sent."""
    root = tmp_path_factory.mktemp("monitor")
    save_champion(guard_photos=skin_like_photos(4 * HELD_OUT), monitored=True)
    params = write_serve_params(
        root / "params.yaml", f"serve.monitoring.log_path={root}/logs",
        f"serve.monitoring.report_dir={root}/reports", "serve.monitoring.min_answers=20",
    )  # fmt: skip
    held_out = skin_like_photos(HELD_OUT, seed=11)
    cases = {
        "held_out": [png(p) for p in held_out],
        "darkened": [png(p * 0.6) for p in held_out],
        "colour_cast": [png(p * np.array([0.8, 0.9, 1.4])) for p in held_out],
        "non_skin": [png(np.asarray(image.resize((64, 64)))) for _, _, image in non_skin.images()],
    }
    windows, answers = {}, {}
    with running_service(params, root / "server.log") as url:
        for case, photos in cases.items():
            start = datetime.now()
            answers[case] = post_batch(url, photos)
            windows[case] = (start, datetime.now())
        extra = {"image": (f"{UPLOAD_NAME}.png", cases["held_out"][0], "image/png")}
        answers["explain"] = [requests.post(f"{url}/explain", files=extra, timeout=120).json()]
        answers["predict"] = [requests.post(f"{url}/predict", files=extra, timeout=120).json()]
        refused = requests.post(f"{url}/predict", files={"image": ("x.txt", b"not a photo")},
                                timeout=60)  # fmt: skip
        assert refused.status_code == 400
        yield {"url": url, "root": root, "params": params, "windows": windows, "answers": answers}


def report_of(served: dict, case: str) -> dict:
    settings = monitor.MonitoringSettings.from_cfg(
        {**_monitoring_defaults(), "log_path": served["root"] / "logs", "min_answers": 20}
    )
    start, end = served["windows"][case]
    report = drift.check(settings, MODEL_NAME, start, end)
    (model,) = report["models"]
    assert model["answers"] == len(served["answers"][case])
    return model


def _monitoring_defaults() -> dict:
    from pox_pipeline.config import compose

    return dict(compose([]).serve.monitoring)


def drifted(model: dict) -> set[str]:
    return {test["column"] for test in model["tests"] if test["drift"]}


def test_held_out_photos_show_no_drift(served: dict) -> None:
    model = report_of(served, "held_out")
    assert model["status"] == "no drift", model
    assert {t["column"] for t in model["tests"]} >= {
        "label", "positive_probability", "in_distribution", *monitor.STATISTICS, "head_pc1",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("case", "expected"),
    [("darkened", {"brightness"}), ("colour_cast", {"blue_mean", "chroma_blue"})],
)
def test_changed_photos_drift_in_image_statistics(
    served: dict, case: str, expected: set[str]
) -> None:
    model = report_of(served, case)
    assert model["status"] == "drift"
    assert expected <= drifted(model), model


def test_non_skin_images_drift_in_guard_flag_rate(served: dict) -> None:
    model = report_of(served, "non_skin")
    flag_rate = next(t for t in model["tests"] if t["column"] == "in_distribution")
    assert flag_rate["drift"] and flag_rate["current"] > flag_rate["reference"], flag_rate


def test_records_hold_no_photo_and_no_file_name(served: dict) -> None:
    files = [p for p in (served["root"] / "logs").rglob("*") if p.is_file()]
    data = b"".join(p.read_bytes() for p in files)
    assert b"\x89PNG" not in data and b"iVBOR" not in data  # PNG bytes, raw or base64
    assert UPLOAD_NAME.encode() not in data
    records = drift.read_records(served["root"] / "logs", datetime.now() - timedelta(hours=1))
    sent = sum(len(a) for a in served["answers"].values())
    assert len(records) == sent
    basis_columns = [c for c in records.columns if c.startswith("head_pc")]
    assert set(records.columns) == {
        "timestamp", "request_id", "trace_id", "endpoint", "model_version", *monitor.ANSWER_COLUMNS,
        *monitor.GUARD_COLUMNS, *monitor.STATISTICS, *basis_columns,
    }  # fmt: skip
    assert 0 < len(basis_columns) <= 8
    assert set(records["endpoint"]) == {"predict_batch", "explain", "predict"}


def metric_samples(url: str) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"{url}/metrics", timeout=30).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_the_answers_sent(served: dict) -> None:
    samples = metric_samples(served["url"])
    answers = [a for case in served["answers"].values() for a in case]
    counted = {key: value for key, value in samples.items() if key[0] == "pox_answers_total"}
    assert sum(counted.values()) == len(answers)
    outside = sum(v for (_, labels), v in counted.items() if ("in_distribution", "false") in labels)
    assert outside == sum(not a["in_distribution"] for a in answers)
    for label in {a["label"] for a in answers}:
        sent = sum(a["label"] == label for a in answers)
        shown = "none" if label is None else label  # a refused photo's series: label="none"
        assert sum(v for (_, labels), v in counted.items() if ("label", shown) in labels) == sent
    # a refused photo has no probability: the histogram counts the answers that carry one
    with_probability = sum(a["probabilities"] is not None for a in answers)
    assert samples[("pox_positive_probability_count", ())] == with_probability
    assert samples[("pox_guard_score_count", ())] == len(answers)
    assert samples[("pox_rejected_uploads_total", (("status", "400"),))] == 1


def test_pox_monitor_reports_and_exits_non_zero_on_drift(served: dict) -> None:
    runner = CliRunner()
    env = {"POX_PARAMS": str(served["params"])}
    result = runner.invoke(pox, ["monitor", "--since", "1h"], env=env)
    assert result.exit_code == 1, result.output
    report = json.loads((served["root"] / "reports" / monitor.REPORT_JSON).read_text())
    assert report["drift"] and report["status"] == "drift"
    html = (served["root"] / "reports" / monitor.REPORT_HTML).read_text()
    numeric = [t for t in report["models"][0]["tests"] if t["test"] == "ks_exact"]
    assert html.count("<img") == len(numeric) > 10
    assert "brightness" in result.output
    # the last result as gauges on /metrics
    samples = metric_samples(served["url"])
    assert samples[("pox_drift_detected", ())] == 1
    assert samples[("pox_drift_answers", ())] == report["answers"]
    # too few answers: says so, exits 0
    few = runner.invoke(pox, ["monitor", "--since", "1h", "--min-answers", "100000"], env=env)
    assert few.exit_code == 0 and "not enough answers" in few.output


def test_rotation_deletes_days_older_than_retention(tmp_path: Path) -> None:
    current = tmp_path / "data.0.log"
    today = datetime.now()
    days = {age: tmp_path / f"data.0.log.{(today - timedelta(days=age)):%Y-%m-%d}"
            for age in (2, 3, 10)}  # fmt: skip
    for path in days.values():
        path.write_text("{}\n")
    unrelated = tmp_path / "data.0.log.notes"
    unrelated.write_text("kept")
    handler = monitor.RetainedDailyFileHandler(str(current), retention_days=2)
    assert not days[3].exists() and not days[10].exists()  # deleted at start
    days[3].write_text("{}\n")  # a day file left behind, seen at the next rotation
    try:
        handler.emit(_record("first"))
        handler.rolloverAt = int(time.time())  # midnight has passed: yesterday's file
        handler.emit(_record("second"))
    finally:
        handler.close()
    rotated = sorted(p.name for p in tmp_path.glob("data.0.log.*"))
    assert not days[3].exists()
    assert days[2].exists() and unrelated.exists()
    assert "second" in current.read_text() and "first" not in current.read_text()
    yesterday = tmp_path / f"data.0.log.{(today - timedelta(days=1)):%Y-%m-%d}"
    assert "first" in yesterday.read_text()
    assert len(rotated) == 3  # day 2, the notes, and the day just rotated


def _record(message: str):
    import logging

    return logging.LogRecord("bentoml_monitor_data", logging.INFO, __file__, 0, message, None, None)


def test_holm_adjusts_in_input_order() -> None:
    assert np.allclose(drift.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])


def test_psi_is_zero_for_the_same_sample_and_large_for_a_shift() -> None:
    reference = np.random.default_rng(0).uniform(size=500)
    assert drift.psi(reference, reference, 10) == pytest.approx(0.0)
    assert drift.psi_level(drift.psi(reference, reference * 0.5, 10)) == "major"


def test_a_refitted_models_reference_holds_its_out_of_fold_answers(tmp_path: Path) -> None:
    """After a refit the served model trained on every reference photo, and each sits in its
    guard's reference: its in-sample answers there would make new genuine photos look like
    drift (seen on the MSLD champion: guard scores 'drifted' on its own test photos). The
    table must hold the fold models' outputs and each photo's out-of-fold guard ratios."""
    import pandas as pd

    from pox_pipeline import ood
    from pox_pipeline.config import compose
    from pox_pipeline.inference import load_keras_model
    from serve_helpers import CLASSES, tiny_guard_overrides, tiny_guard_settings, tiny_model

    photos = skin_like_photos(24, seed=5).astype(np.float32)
    folds = np.arange(len(photos)) % 3
    model_file = tmp_path / "model.keras"
    tiny_model().save(model_file)
    guard, ratios = ood.fit_guard_out_of_fold(
        load_keras_model(model_file), photos, folds, tiny_guard_settings(alpha=0.2), "none"
    )
    in_sample = guard.scores(ood.features_of(load_keras_model(model_file), photos,
                                             tiny_guard_settings(), "none"))  # fmt: skip
    assert (ratios.max(axis=1) > in_sample).all()  # own photo among its neighbours: too near
    oof_outputs = np.linspace(0.05, 0.95, len(photos))[:, None]
    metadata = {"classes": list(CLASSES), "positive_class": CLASSES[0], "threshold": 0.5,
                "image_size": photos.shape[1], "resample": "bilinear", "tta": "none",
                "registered_model_name": MODEL_NAME, "ood": guard.metadata()}  # fmt: skip
    served = {ood.OOD_FILE: guard.save(tmp_path / ood.OOD_FILE)}
    serve_cfg = compose(tiny_guard_overrides()).serve
    held_out = drift.HeldOutScores(oof_outputs, ratios)
    files, entry = drift.write_reference(model_file, metadata, photos, photos, serve_cfg,
                                         tmp_path, served, held_out)  # fmt: skip
    table = pd.read_csv(files[drift.REFERENCE_FILE])
    assert entry["reference_answers"] == "out_of_fold"
    inside = ratios.max(axis=1) <= 1
    assert (table["in_distribution"].to_numpy() == inside).all()
    np.testing.assert_allclose(table["guard_head"], ratios[:, 0], rtol=1e-6)
    np.testing.assert_allclose(table["ood_score"], ratios.max(axis=1), rtol=1e-6)
    answered = table["positive_probability"].notna().to_numpy()
    assert (answered == inside).all()  # a refused photo has no probability
    np.testing.assert_allclose(table["positive_probability"][answered], oof_outputs[inside, 0],
                               rtol=1e-6)  # fmt: skip


def test_the_monitored_pass_answers_and_scores_as_the_guarded_pass() -> None:
    """The OOD score of a monitored batch comes from the guard ratios it records (each
    neighbour search runs once): the same score and answer as without monitoring, and the
    largest of the recorded per-space ratios."""
    from pox_pipeline import serve

    photos = skin_like_photos(40)
    stored = bentoml.models.get(save_champion(guard_photos=photos, monitored=True))
    batch = np.concatenate([photos[-5:], np.zeros_like(photos[:1])])  # a black square is out
    plain = serve.Predictor.from_stored(stored).outputs_with_ood_score(batch)
    monitored = serve.Predictor.from_stored(stored, monitoring=True).outputs_with_monitoring(batch)
    np.testing.assert_allclose(monitored[:, : plain.shape[1]], plain, rtol=1e-6)
    _, columns = monitor.split_columns(monitored, len(monitor.Basis.load(
        Path(stored.path) / monitor.BASIS_FILE).columns))  # fmt: skip
    ratios = columns[:, : len(monitor.GUARD_COLUMNS)]
    np.testing.assert_allclose(ratios.max(axis=1), plain[:, -1], rtol=1e-6)
    assert plain[-1, -1] > 1  # the check covers an image the guard refuses
