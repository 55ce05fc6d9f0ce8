"""Production monitoring (issues 21, 27): records of a real server on 127.0.0.1, the drift tests
on them, the /metrics series, privacy of the files and their rotation; a monitoring folder the
service cannot write; readers and writers of the same files at the same time."""

from __future__ import annotations

import io
import json
import threading
import time
import warnings
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import bentoml
import numpy as np
import pytest
import requests
from click.testing import CliRunner
from PIL import Image
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from helpers.serve import (
    MODEL_NAME,
    running_service,
    save_champion,
    skin_like_photos,
    write_serve_params,
)
from pox_pipeline.guard import non_skin
from pox_pipeline.ops import drift
from pox_pipeline.ops.cli import main as pox
from pox_pipeline.release import reference
from pox_pipeline.release.settings import PublishConfig
from pox_pipeline.serving import monitor

HELD_OUT = 30  # photos per case; the reference has the guard photos' last quarter (30)
UPLOAD_NAME = "patient-0042-lesion"  # a file name that must not reach the records
BATCH = 32  # serve.max_images_per_request
# The served test's records are stamped to the second (the default, an hour, would put every
# case in one window); a pause this long between cases keeps each in a window of its own.
RESOLUTION_S = 1


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


def test_a_monitoring_folder_it_cannot_write_leaves_the_service_answering(
    tmp_path: Path,
) -> None:
    """The container's case (issue 27): the monitoring folder cannot be written (here: a path
    under a regular file, which stops root too, where chmod would not). The service starts,
    answers, logs one WARNING with the reason and says on /metrics that monitoring is off.
    The folder comes from $POX_MONITORING_DIR, which replaces serve.monitoring.dir."""
    save_champion(guard_photos=skin_like_photos(4 * HELD_OUT), monitored=True)
    params = write_serve_params(tmp_path / "params.yaml")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    log = tmp_path / "server.log"
    env = {monitor.MONITORING_DIR_ENV: str(blocker / "monitoring")}
    with running_service(params, log, extra_env=env) as url:
        photo = {"image": ("photo.png", png(skin_like_photos(1, seed=3)[0]), "image/png")}
        answer = requests.post(f"{url}/predict", files=photo, timeout=120)
        assert answer.status_code == 200, answer.text
        samples = metric_samples(url)
    assert samples[("pox_monitoring_enabled", ())] == 0
    [reason] = [dict(labels)["reason"] for name, labels in samples
                if name == "pox_monitoring_info"]  # fmt: skip
    assert str(blocker / "monitoring" / "records") in reason and "Not a directory" in reason
    assert sum(v for (name, _), v in samples.items() if name == "pox_answers_total") == 1
    warned = [line for line in log.read_text().splitlines() if "monitoring is OFF" in line]
    assert len(warned) == 1 and "WARNING" in warned[0] and "Not a directory" in warned[0], warned
    assert not (tmp_path / "monitoring").exists()  # the setting's folder was not used either


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """A monitored tiny champion served, and every case posted: held-out photos like the
    reference, the same darkened by 40 %, the same with a blue cast, the non-skin images;
    then one /explain, one /predict and one refused upload. Yields what each case sent."""
    root = tmp_path_factory.mktemp("monitor")
    save_champion(guard_photos=skin_like_photos(4 * HELD_OUT), monitored=True)
    params = write_serve_params(
        root / "params.yaml", "serve.monitoring.dir=monitoring", "serve.monitoring.min_answers=20",
        f"serve.monitoring.timestamp_resolution={RESOLUTION_S}s",
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
            time.sleep(RESOLUTION_S)  # the next answer's stamp is past this window
        extra = {"image": (f"{UPLOAD_NAME}.png", cases["held_out"][0], "image/png")}
        answers["explain"] = [requests.post(f"{url}/explain", files=extra, timeout=120).json()]
        answers["predict"] = [requests.post(f"{url}/predict", files=extra, timeout=120).json()]
        refused = requests.post(f"{url}/predict", files={"image": ("x.txt", b"not a photo")},
                                timeout=60)  # fmt: skip
        assert refused.status_code in (400, 415)  # 415 once only photo formats are decoded
        yield {"url": url, "root": root, "params": params, "windows": windows, "answers": answers,
               "refused": refused.status_code}  # fmt: skip


def report_of(served: dict, case: str) -> dict:
    settings = monitor.MonitoringSettings.from_cfg(
        {**_monitoring_defaults(), "dir": "monitoring", "min_answers": 20,
         "timestamp_resolution": f"{RESOLUTION_S}s"}, served["root"],
    )  # fmt: skip
    start, end = served["windows"][case]
    report = drift.check(settings, MODEL_NAME, start, end)
    (model,) = report["models"]
    assert model["answers"] == len(served["answers"][case])
    return model


def _monitoring_defaults() -> dict:
    from omegaconf import OmegaConf

    from pox_pipeline.common.config import compose

    return OmegaConf.to_container(compose([]).serve.monitoring, resolve=True)


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
    files = [p for p in (served["root"] / "monitoring").rglob("*") if p.is_file()]
    data = b"".join(p.read_bytes() for p in files)
    assert b"\x89PNG" not in data and b"iVBOR" not in data  # PNG bytes, raw or base64
    assert UPLOAD_NAME.encode() not in data
    records, skipped = drift.read_records(served["root"] / "monitoring" / "records",
                                          datetime.now() - timedelta(hours=1))  # fmt: skip
    sent = sum(len(a) for a in served["answers"].values())
    assert len(records) == sent and skipped == 0
    basis_columns = [c for c in records.columns if c.startswith("head_pc")]
    # no request or trace id: nothing joins a record to an access log line
    assert set(records.columns) == {
        "timestamp", "endpoint", "model_version", *monitor.ANSWER_COLUMNS,
        *monitor.GUARD_COLUMNS, *monitor.STATISTICS, *basis_columns,
    }  # fmt: skip
    assert 0 < len(basis_columns) <= 8
    assert set(records["endpoint"]) == {"predict_batch", "explain", "predict"}
    stamps = {datetime.fromisoformat(stamp) for stamp in records["timestamp"]}
    assert all(stamp.microsecond == 0 for stamp in stamps)  # truncated to the second


def metric_samples(url: str) -> dict[tuple[str, tuple], float]:
    response = requests.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    return _samples(response.text)


def _samples(text: str) -> dict[tuple[str, tuple], float]:
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
    assert samples[("pox_rejected_uploads_total", (("status", str(served["refused"])),))] == 1


def test_pox_monitor_reports_and_exits_non_zero_on_drift(served: dict) -> None:
    runner = CliRunner()
    env = {"POX_PARAMS": str(served["params"])}
    result = runner.invoke(pox, ["monitor", "--since", "1h"], env=env)
    assert result.exit_code == 1, result.output
    reports = served["root"] / "monitoring" / "reports"
    report = json.loads((reports / monitor.REPORT_JSON).read_text())
    assert report["drift"] and report["status"] == "drift"
    html = (reports / monitor.REPORT_HTML).read_text()
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
    # another monitoring directory (a volume) by --dir: the same records, the same verdict
    elsewhere = runner.invoke(pox, ["monitor", "--since", "1h", "--dir",
                                    str(served["root"] / "monitoring")], env=env)  # fmt: skip
    assert elsewhere.exit_code == 1, elsewhere.output


@pytest.mark.parametrize(
    "content",
    [b"", b'{"drift": true, "answers": 3', b"\xff\xfe not json", b"[]", b'{"drift": true}',
     b'{"drift": 1, "answers": 2, "generated_at_unix": 0, "models": [{"tests": [{}]}]}'],
    ids=["empty", "half-written", "garbage", "a list", "wrong keys", "wrong tests"],
)  # fmt: skip
def test_metrics_never_fail_because_of_the_report(served: dict, content: bytes) -> None:
    """A scrape while any report file lies there: the other series, and the report unreadable."""
    report = served["root"] / "monitoring" / "reports" / monitor.REPORT_JSON
    report.parent.mkdir(parents=True, exist_ok=True)
    kept = report.read_bytes() if report.is_file() else None
    report.write_bytes(content)  # in place, as an old writer did
    try:
        samples = metric_samples(served["url"])
    finally:
        if kept is None:
            report.unlink()
        else:
            report.write_bytes(kept)
    assert samples[("pox_drift_report_readable", ())] == 0
    assert ("pox_drift_detected", ()) not in samples
    assert samples[("pox_monitoring_enabled", ())] == 1
    assert samples[("pox_monitoring_info", (("reason", "on"),))] == 1
    assert any(name == "pox_answers_total" for name, _ in samples)


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

    from helpers.models import tiny_model
    from helpers.serve import CLASSES, tiny_guard_overrides, tiny_guard_settings
    from pox_pipeline.common.config import compose
    from pox_pipeline.guard import ood
    from pox_pipeline.models.inference import load_keras_model

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
    config = PublishConfig.from_cfg(compose(tiny_guard_overrides()))
    held_out = reference.HeldOutScores(oof_outputs, ratios)
    files, entry = reference.write_reference(model_file, metadata, photos, photos, config,
                                             tmp_path, served, held_out)  # fmt: skip
    table = pd.read_csv(files[monitor.REFERENCE_FILE])
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
    from pox_pipeline.serving.predictor import Predictor

    photos = skin_like_photos(40)
    stored = bentoml.models.get(save_champion(guard_photos=photos, monitored=True))
    batch = np.concatenate([photos[-5:], np.zeros_like(photos[:1])])  # a black square is out
    plain = Predictor.from_stored(stored).outputs_with_ood_score(batch)
    monitored = Predictor.from_stored(stored, monitoring=True).outputs_with_monitoring(batch)
    np.testing.assert_allclose(monitored[:, : plain.shape[1]], plain, rtol=1e-6)
    _, columns = monitor.split_columns(monitored, len(monitor.Basis.load(
        Path(stored.path) / monitor.BASIS_FILE).columns))  # fmt: skip
    ratios = columns[:, : len(monitor.GUARD_COLUMNS)]
    np.testing.assert_allclose(ratios.max(axis=1), plain[:, -1], rtol=1e-6)
    assert plain[-1, -1] > 1  # the check covers an image the guard refuses


# ---------------------------------------------------------------------------- without a server


def _answer(version: str = "v1") -> dict:
    return {"model": {"version": version}, "label": "pox", "in_distribution": True,
            "probabilities": {"pox": 0.9, "other": 0.1}, "ood": {"score": 0.5}}  # fmt: skip


def unit_monitor(root: Path, **settings: object) -> monitor.ServiceMonitor:
    """A ServiceMonitor on a two-component basis, its live series in a registry of its own."""
    model_dir = root / "model"
    model_dir.mkdir(exist_ok=True)
    monitor.Basis(np.zeros(4), np.eye(2, 4)).save(model_dir / monitor.BASIS_FILE)
    values = monitor.MonitoringSettings.from_cfg({**_monitoring_defaults(), **settings}, root)
    return monitor.ServiceMonitor(values, model_dir, SimpleNamespace(positive_class="pox"),
                                  CollectorRegistry())  # fmt: skip


def record_lines(records_dir: Path) -> list[dict]:
    files = sorted(records_dir.rglob("data.*.log*"))
    return [json.loads(line) for path in files for line in path.read_text().splitlines()]


def test_a_record_keeps_the_hour_and_nothing_that_joins_it_to_a_request(tmp_path: Path) -> None:
    service = unit_monitor(tmp_path)  # the shipped default: 1h
    assert service.enabled and service.reason == "on"
    before = datetime.now()
    service.record("predict", [_answer()], np.zeros((1, len(service.columns))))
    after = datetime.now()
    [line] = record_lines(tmp_path / "monitoring" / "records")
    assert "request_id" not in line and "trace_id" not in line
    hours = {moment.replace(minute=0, second=0, microsecond=0) for moment in (before, after)}
    assert datetime.fromisoformat(line["timestamp"]) in hours
    assert line["timestamp"].endswith(":00:00")


def _record_line(stamp: datetime) -> str:
    row = monitor.records([_answer()], np.zeros((1, 0)), (), "pox")[0]
    return json.dumps({**row, "timestamp": stamp.isoformat()})


def test_windows_take_whole_buckets_of_coarse_timestamps(tmp_path: Path) -> None:
    """A window from 10:20 must still find the records stamped 10:00 (not 08:00's): it starts
    at the start of its first hour."""
    records_dir = tmp_path / "monitoring" / "records" / "pox_answers" / "data"
    records_dir.mkdir(parents=True)
    hour = datetime.now().replace(minute=0, second=0, microsecond=0)
    stamps = (hour - timedelta(hours=2), hour)
    (records_dir / "data.1.log").write_text("".join(_record_line(t) + "\n" for t in stamps))
    settings = monitor.MonitoringSettings.from_cfg(_monitoring_defaults(), tmp_path)
    report = drift.check(settings, "no-such-model", hour + timedelta(minutes=20))
    assert report["answers"] == 1 and report["window"]["start"] == hour.isoformat()
    assert report["models"][0]["status"] == "no reference"


def test_a_partial_or_damaged_record_line_is_skipped_and_counted(tmp_path: Path) -> None:
    """A record being written (its last line half there) and a damaged line in the middle:
    `pox monitor` reads the others, counts both, says so, and exits as without them."""
    records_dir = tmp_path / "monitoring" / "records" / "pox_answers" / "data"
    records_dir.mkdir(parents=True)
    line = _record_line(datetime.now().replace(microsecond=0))
    (records_dir / "data.1.log").write_text(f"{line}\n{line[:40]}\x00garbage\n{line}\n")
    (records_dir / "data.2.log").write_text(f"{line}\n{line[: len(line) // 2]}")  # mid-write
    frame, skipped = drift.read_records(records_dir, datetime.now() - timedelta(hours=1))
    assert len(frame) == 3 and skipped == 2
    params = write_serve_params(tmp_path / "params.yaml")
    result = CliRunner().invoke(pox, ["monitor", "--dir", str(tmp_path / "monitoring")],
                                env={"POX_PARAMS": str(params)})  # fmt: skip
    assert result.exit_code == 0, result.output  # a model version without reference: no drift
    assert "skipped 2 record lines" in result.output
    report = json.loads((tmp_path / "monitoring" / "reports" / monitor.REPORT_JSON).read_text())
    assert report["skipped_lines"] == 2 and report["answers"] == 3


def test_an_unwritable_folder_turns_records_off_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level("WARNING", logger="pox_pipeline.serving.monitor"):
        service = unit_monitor(tmp_path, dir=str(blocker / "monitoring"))
    assert not service.enabled and "Not a directory" in service.reason
    [warning] = [r for r in caplog.records if r.name == "pox_pipeline.serving.monitor"]
    assert warning.levelname == "WARNING" and "monitoring is OFF" in warning.getMessage()
    service.record("predict", [_answer()], np.zeros((1, len(service.columns))))  # no error
    assert service.metrics.answers.labels("predict", "pox", "true")._value.get() == 1
    samples = _samples(service.metrics_text(""))
    assert samples[("pox_monitoring_enabled", ())] == 0
    assert samples[("pox_monitoring_info", (("reason", service.reason),))] == 1


def test_a_report_being_rewritten_is_always_whole_to_a_reader(tmp_path: Path) -> None:
    """pox monitor rewrites drift.json while /metrics scrapes read it: every read sees a
    whole report (written through a temporary file and a rename)."""
    tests = [{"column": f"c{i}", "test": "ks_exact", "p_value": 0.5, "p_adjusted": 0.5,
              "drift": False, "current": 0.1, "reference": 0.2} for i in range(3000)]  # fmt: skip
    report = {"status": "no drift", "drift": False, "answers": 40, "alpha": 0.01,
              "generated_at_unix": 1.0, "skipped_lines": 0,
              "window": {"start": "2025-01-01T00:00:00", "end": "2025-01-02T00:00:00"},
              "models": [{"model": "m", "model_version": "v", "status": "no drift",
                          "answers": 40, "tests": tests}]}  # fmt: skip
    report_file = tmp_path / monitor.REPORT_JSON
    drift.write_report(report, tmp_path)
    done = threading.Event()

    def rewrite() -> None:
        while not done.is_set():
            drift.write_report(report, tmp_path)

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        reads = [monitor.drift_gauges(report_file) for _ in range(300)]
    finally:
        done.set()
        writer.join()
    assert all("pox_drift_report_readable 1" in text for text in reads)
    assert sorted(p.name for p in tmp_path.iterdir()) == [monitor.REPORT_HTML, monitor.REPORT_JSON]


def test_the_monitoring_directory_starts_at_the_project_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative serve.monitoring.dir starts at the params file's folder, whatever the working
    directory; $POX_MONITORING_DIR replaces it; the old keys still work, with a warning."""
    defaults = _monitoring_defaults()
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "project"
    settings = monitor.MonitoringSettings.from_cfg(defaults, root)
    assert settings.records_dir == root / "monitoring" / "records"
    assert settings.reports_dir == root / "monitoring" / "reports"
    monkeypatch.setenv(monitor.MONITORING_DIR_ENV, "/var/lib/pox-monitoring")
    settings = monitor.MonitoringSettings.from_cfg(defaults, root)
    assert settings.records_dir == Path("/var/lib/pox-monitoring/records")
    monkeypatch.delenv(monitor.MONITORING_DIR_ENV)
    old = {k: v for k, v in defaults.items() if k != "dir"}
    with pytest.warns(FutureWarning, match="serve.monitoring.dir"):
        settings = monitor.MonitoringSettings.from_cfg(
            {**old, "log_path": "monitoring", "report_dir": "reports/monitoring"}, root
        )
    assert settings.records_dir == root / "monitoring"  # where those records were
    assert settings.reports_dir == root / "reports" / "monitoring"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new key alone: no warning
        monitor.MonitoringSettings.from_cfg(defaults, root)
    with pytest.raises(ValueError, match="divides a day"):
        monitor.MonitoringSettings.from_cfg(
            {**defaults, "timestamp_resolution": "7m"}, root
        )
