"""The alert rules in deploy/prometheus/ in a real Prometheus (Debian's ``prometheus``, which
.ci/run installs): ``promtool`` checks the rules, runs their unit tests and checks the example
configuration; then Prometheus, configured from that example with second-long intervals, scrapes
a served monitored champion on 127.0.0.1. It sees the project's series and BentoML's, and the
drift alert goes to firing after a drifted window and ``pox monitor``."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from click.testing import CliRunner

from helpers.serve import (
    encoded,
    free_port,
    running_service,
    save_champion,
    skin_like_photos,
    write_serve_params,
)
from helpers.suite import PROJECT_ROOT
from pox_pipeline.ops.cli import main as pox

RULES_DIR = PROJECT_ROOT / "deploy" / "prometheus"
HELD_OUT = 30  # photos per case, as test_monitor.py (beside it): the guard photos' last quarter
INTERVAL = "1s"  # scrape and rule evaluation, instead of the example's 30 s
READY_TIMEOUT_S = 60
ALERT_TIMEOUT_S = 60  # a few scrapes and evaluations
STOP_TIMEOUT_S = 20

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="Prometheus is needed (Debian: apt-get install prometheus; .ci/run installs it)",
)


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=RULES_DIR, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


@pytest.mark.parametrize(
    "check",
    [
        ("check", "rules", "pox-alerts.yml"),
        ("test", "rules", "pox-alerts.test.yml"),
        ("check", "config", "prometheus.yml"),
    ],
    ids=" ".join,
)
def test_promtool_accepts_the_rules_their_unit_tests_and_the_example(check: tuple) -> None:
    done = promtool(*check)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A monitored tiny champion served with its monitoring directory in a temporary folder."""
    root = tmp_path_factory.mktemp("prometheus")
    save_champion(guard_photos=skin_like_photos(4 * HELD_OUT), monitored=True)
    params = write_serve_params(root / "params.yaml", f"serve.monitoring.dir={root}/monitoring",
                                "serve.monitoring.min_answers=20")  # fmt: skip
    with running_service(params, root / "server.log") as url:
        yield {"url": url, "root": root, "params": params}


@pytest.fixture(scope="module")
def prometheus(served: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus on 127.0.0.1, configured as deploy/prometheus/prometheus.yml says with the
    service as its target and one-second intervals; yields its base URL."""
    root = tmp_path_factory.mktemp("prometheus-server")
    config = yaml.safe_load((RULES_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=INTERVAL, scrape_timeout=INTERVAL,
                            evaluation_interval=INTERVAL)  # fmt: skip
    config["rule_files"] = [str(RULES_DIR / name) for name in config["rule_files"]]
    (scrape,) = config["scrape_configs"]
    scrape["static_configs"] = [{"targets": [served["url"].removeprefix("http://")]}]
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    log = root / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["prometheus", f"--config.file={root / 'prometheus.yml'}",
             f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address={url[7:]}"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: ready(url), READY_TIMEOUT_S, f"Prometheus at {url}", process, log)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/-/ready", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def wait_for(
    condition: Callable[[], bool], timeout_s: float, what: str,
    process: subprocess.Popen | None = None, log: Path | None = None,
) -> None:  # fmt: skip
    """Poll ``condition`` every half second until it holds; fail after ``timeout_s`` or when
    ``process`` exits, with ``log``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        shown = f":\n{log.read_text()}" if log else ""
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what} exited ({process.returncode}){shown}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s} s{shown}")
        time.sleep(0.5)


def query(url: str, promql: str) -> list[dict]:
    """Prometheus' HTTP API: an instant query's samples."""
    answer = requests.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def alert_states(url: str) -> dict[str, str]:
    """Alert name -> pending / firing, for the alerts that are active."""
    answer = requests.get(f"{url}/api/v1/alerts", timeout=10).json()
    return {alert["labels"]["alertname"]: alert["state"] for alert in answer["data"]["alerts"]}


def post_batch(url: str, photos: list[np.ndarray]) -> None:
    files = [("images", (f"photo-{i}.png", encoded(np.clip(photo, 0, 255)), "image/png"))
             for i, photo in enumerate(photos)]  # fmt: skip
    response = requests.post(f"{url}/predict_batch", files=files, timeout=120)
    assert response.status_code == 200, response.text


def test_prometheus_sees_the_projects_series_and_bentomls(served: dict, prometheus: str) -> None:
    post_batch(served["url"], list(skin_like_photos(2, seed=11)))
    series = {
        "up": 'up{job="pox-classifier"}',
        "monitoring on": "pox_monitoring_enabled",
        "answers": "sum(pox_answers_total)",
        "requests": 'sum(bentoml_service_request_total{service_name="pox-classifier", '
        'endpoint="/predict_batch", http_response_code="200"})',
        "latency": 'bentoml_service_request_duration_seconds_bucket{endpoint="/predict_batch"}',
    }

    def scraped() -> bool:
        return all(query(prometheus, promql) for promql in series.values()) and (
            float(query(prometheus, series["answers"])[0]["value"][1]) >= 2
        )

    wait_for(scraped, ALERT_TIMEOUT_S, f"the series {list(series)} in Prometheus")
    assert float(query(prometheus, series["up"])[0]["value"][1]) == 1
    assert float(query(prometheus, series["monitoring on"])[0]["value"][1]) == 1
    rules = requests.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {rule["name"]: rule for group in rules for rule in group["rules"]}
    expected = yaml.safe_load((RULES_DIR / "pox-alerts.yml").read_text())
    assert loaded.keys() == {r["alert"] for g in expected["groups"] for r in g["rules"]}
    wait_for(lambda: all(r["health"] == "ok" for r in rules_now(prometheus)), ALERT_TIMEOUT_S,
             "every rule evaluated without error")  # fmt: skip
    assert not alert_states(prometheus)  # a healthy service with no drift report: all quiet


def rules_now(url: str) -> list[dict]:
    groups = requests.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_the_drift_alert_fires_after_a_drifted_window_and_pox_monitor(
    served: dict, prometheus: str
) -> None:
    assert "PoxDriftDetected" not in alert_states(prometheus)
    darkened = skin_like_photos(HELD_OUT, seed=11) * 0.6  # drifts in brightness (test_monitor)
    post_batch(served["url"], list(darkened))
    folder = served["root"] / "monitoring"
    result = CliRunner().invoke(
        pox, ["monitor", "--dir", str(folder), "--since", "1d", "--min-answers", "20"],
        env={"POX_PARAMS": str(served["params"])},
    )  # fmt: skip
    assert result.exit_code == 1, result.output  # drift
    assert (folder / "reports" / "drift.json").is_file()
    wait_for(lambda: alert_states(prometheus).get("PoxDriftDetected") == "firing",
             ALERT_TIMEOUT_S, "PoxDriftDetected firing")  # fmt: skip
    (sample,) = query(prometheus, "pox_drift_detected")
    assert sample["value"][1] == "1" and sample["metric"]["job"] == "pox-classifier"
