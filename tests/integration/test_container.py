"""The service's image, built and run as ``make container`` / ``make container-run`` /
``make container-stop`` do it (podman), answering as ``make serve`` does for the same champion,
with its monitoring records on the host folder that ``make container-run`` mounts, where
``pox monitor --dir`` reads them. The champion is published by the pipeline's own ``select``
(guard, TFLite backends, monitoring reference: conf/'s defaults) on a stand-in for ``train``
(tests/helpers/training.py) over the session's small synthetic data set, in the test BentoML store:
``dvc repro`` would train for minutes first. The first build downloads the base system and the
Bento's packages (about ten minutes); later builds reuse their layers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bentoml
import pytest
import requests
from bentoml._internal.container.generate import DEFAULT_BENTO_ENVS
from prometheus_client.parser import text_string_to_metric_families

from helpers.serve import free_port, msld_samples, running_service
from helpers.suite import PROJECT_ROOT, tmp_overrides
from helpers.training import fake_trained_model
from pox_pipeline.common.config import compose
from pox_pipeline.release.select import select

IMAGE = "pox-classifier-test"
IMAGE_UID = DEFAULT_BENTO_ENVS["uid_gid"]  # the image's user, BentoML's bentoml (1034)
BUILD_TIMEOUT_S = 1800
REQUEST_TIMEOUT_S = 60
STOP_LIMIT_S = 10  # the grace period `make container-stop` gives before SIGKILL
TOLERANCE = 1e-5
# What deploy/container.sh's podman calls read (the Makefile exports them).
PODMAN_ENV = {
    "CONTAINERS_CONF": str(PROJECT_ROOT / "deploy" / "podman" / "containers.conf"),
    "CONTAINERS_STORAGE_CONF": str(PROJECT_ROOT / "deploy" / "podman" / "storage.conf"),
}

pytestmark = [
    pytest.mark.container,
    pytest.mark.msld,
    pytest.mark.skipif(
        shutil.which("podman") is None,
        reason="podman is needed (Debian: apt-get install podman buildah runc debootstrap "
        "containernetworking-plugins uidmap iptables; .ci/run installs them)",
    ),
]


def make_run(*args: str, timeout: float = BUILD_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``make ARGS`` with podman and the test image (a later ``POX_IMAGE=`` wins)."""
    return subprocess.run(
        ["make", "--no-print-directory", "POX_CONTAINER_ENGINE=podman", f"POX_IMAGE={IMAGE}",
         *args],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def make(*args: str, timeout: float = BUILD_TIMEOUT_S) -> str:
    done = make_run(*args, timeout=timeout)
    assert done.returncode == 0, f"make {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def podman(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, env={**os.environ, **PODMAN_ENV},
        timeout=REQUEST_TIMEOUT_S,
    )  # fmt: skip


def predict(url: str, photo: Path) -> requests.Response:
    with photo.open("rb") as data:
        return requests.post(f"{url}/predict", files={"image": data}, timeout=REQUEST_TIMEOUT_S)


def metric_samples(url: str) -> dict[str, float]:
    """``/metrics``' unlabelled samples by name (the project's gauges)."""
    text = requests.get(f"{url}/metrics", timeout=REQUEST_TIMEOUT_S).text
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if not sample.labels}  # fmt: skip


@dataclass(frozen=True)
class Container:
    name: str
    url: str
    monitoring: Path  # the host folder mounted as the container's monitoring directory


@pytest.fixture(scope="module")
def photo() -> Path:
    return msld_samples(1)[0]


@pytest.fixture(scope="module")
def selected(prepared_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``select``'s result: one fake-trained candidate, published as the pipeline does, under
    the model name bentofile.yaml ships (conf/'s ``select.bentoml_model_name``)."""
    root = tmp_path_factory.mktemp("select")
    data = prepared_root / "datas"
    cfg = compose([*tmp_overrides(root), f"paths.prepared_dir={data}/prepared",
                   f"synthetic.out_dir={data}/synthetic", "models=[cnn]"])  # fmt: skip
    assert cfg.serve.monitoring.enabled and cfg.publish.guard.fit  # what select publishes
    fake_trained_model(cfg, "cnn")
    evaluation = Path(cfg.paths.reports_dir) / "eval" / "cnn"
    evaluation.mkdir(parents=True)
    (evaluation / "selection_metrics.json").write_text(json.dumps(
        {"threshold": 0.5, "threshold_rule": "fixed", "auc": 0.8, "n_val": 10}
    ))  # fmt: skip
    return select(cfg)


@pytest.fixture(scope="module")
def champion(selected: dict) -> str:
    stored = bentoml.models.get("pox-classifier:latest")  # what the Bento packs
    assert str(stored.tag) == selected["bentoml_tag"]
    assert stored.info.metadata["monitoring"] and stored.info.metadata["ood"]
    return selected["bentoml_tag"]


@pytest.fixture(scope="module")
def served_answer(champion: str, photo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``make serve``'s answer: the project's service with the params.yaml the Bento ships
    (its records in a temporary folder, not the project's)."""
    root = tmp_path_factory.mktemp("make-serve")
    env = {"POX_MONITORING_DIR": str(root / "monitoring")}
    with running_service(PROJECT_ROOT / "params.yaml", root / "server.log", env) as url:
        response = predict(url, photo)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def image(champion: str) -> str:
    started = time.monotonic()
    make("container")
    size = podman("image", "inspect", "--format", "{{.Size}}", f"{IMAGE}:latest").stdout
    print(f"\nmake container: {time.monotonic() - started:.0f} s, {int(size) / 1e6:.0f} MB")
    return f"{IMAGE}:latest"


@pytest.fixture(scope="module")
def container(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """``make container-run``, after a failed run left a stopped container of the same name."""
    name, port = f"{IMAGE}-{os.getpid()}", free_port()
    monitoring = tmp_path_factory.mktemp("container") / "monitoring"
    assert podman("create", "--name", name, image).returncode == 0  # the leftover
    try:
        started = time.monotonic()
        make("container-run", f"POX_CONTAINER_NAME={name}", f"POX_PORT={port}",
             f"POX_MONITORING_DIR_HOST={monitoring}")  # fmt: skip
        print(f"\nmake container-run (start to /readyz 200): {time.monotonic() - started:.1f} s")
        yield Container(name, f"http://127.0.0.1:{port}", monitoring)
    finally:
        podman("rm", "--force", "--time", "0", name)


def test_the_container_answers_as_make_serve(
    container: Container, photo: Path, served_answer: dict, champion: str
) -> None:
    response = predict(container.url, photo)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"]["version"] == champion.split(":")[1] == served_answer["model"]["version"]
    assert answer["label"] == served_answer["label"]
    if served_answer["probabilities"] is None:  # refused by the guard in both: no scores
        assert answer["probabilities"] is None and answer["in_distribution"] is False
    else:
        assert answer["probabilities"].keys() == served_answer["probabilities"].keys()
        for name, probability in served_answer["probabilities"].items():
            assert answer["probabilities"][name] == pytest.approx(probability, abs=TOLERANCE)
    assert answer["threshold"] == served_answer["threshold"]
    assert answer["ood"]["checked"] and served_answer["ood"]["checked"]  # the guard shipped
    assert answer["ood"]["score"] == pytest.approx(served_answer["ood"]["score"], rel=1e-4)


def test_a_bad_upload_gets_a_4xx_and_the_container_keeps_serving(
    container: Container, photo: Path, tmp_path: Path
) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("this is not a photo\n")
    response = predict(container.url, text)
    assert response.status_code == 415  # no accepted format
    assert "not an image" in response.json()["error"]
    assert predict(container.url, photo).status_code == 200
    for route in ("/readyz", "/livez", "/healthz", "/metrics", "/model-card"):
        assert requests.get(f"{container.url}{route}", timeout=REQUEST_TIMEOUT_S).ok, route


def test_it_runs_as_a_non_root_user_on_a_read_only_root(container: Container) -> None:
    users = podman("top", container.name, "huser", "user").stdout.split()[2:]  # minus headers
    assert users and "root" not in users and "0" not in users, users
    settings = podman("container", "inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}",
                      container.name)  # fmt: skip
    assert settings.stdout.strip() == "true"
    write = podman("exec", container.name, "touch", "/home/bentoml/bento/written")
    assert write.returncode != 0 and "Read-only file system" in write.stderr
    assert podman("exec", container.name, "touch", "/tmp/written").returncode == 0
    inside = podman("exec", container.name, "printenv", "POX_MONITORING_DIR").stdout.strip()
    assert inside == "/var/lib/pox-monitoring"
    assert podman("exec", container.name, "touch", f"{inside}/written").returncode == 0
    assert (container.monitoring / "written").stat().st_uid == IMAGE_UID  # podman's :U


def test_records_land_on_the_host_folder_where_pox_monitor_reads_them(
    container: Container, champion: str
) -> None:
    """The answers' records are in the mounted host folder, monitoring says it is on, and
    ``pox monitor --dir`` (the host's, as a cron job would run it) tests them and writes its
    report there, which the container's /metrics then shows."""
    photos = msld_samples(2)
    for photo in photos:
        assert predict(container.url, photo).status_code == 200
    assert metric_samples(container.url)["pox_monitoring_enabled"] == 1
    records = list((container.monitoring / "records").rglob("data.*.log"))
    assert records and all(path.stat().st_uid == IMAGE_UID for path in records)
    done = subprocess.run(
        [sys.executable, "-m", "pox_pipeline.ops.cli", "monitor",
         "--dir", str(container.monitoring), "--since", "1d", "--min-answers", "1"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stdout + done.stderr  # no drift / drift, no error
    report = json.loads((container.monitoring / "reports" / "drift.json").read_text())
    (model,) = report["models"]
    assert model["model_version"] == champion.split(":")[1]
    assert model["answers"] >= len(photos)  # and those of the tests before
    assert report["drift"] == (done.returncode == 1)
    assert metric_samples(container.url)["pox_drift_detected"] == report["drift"]


def test_a_container_that_does_not_become_ready_is_removed_with_its_log_shown(
    container: Container, tmp_path: Path
) -> None:
    """An image whose server exits at once; and a second run on a running container's name."""
    failing = f"{IMAGE}-failing"
    (tmp_path / "Containerfile").write_text(
        "FROM localhost/debian:bookworm\n"  # make container's base, built by the fixture
        "ENV POX_MONITORING_DIR=/var/lib/pox-monitoring\n"
        'CMD ["sh", "-c", "echo no-model-here >&2; exit 3"]\n'
    )
    assert podman("build", "--quiet", "--tag", failing, str(tmp_path)).returncode == 0
    name = f"{failing}-{os.getpid()}"
    folder = f"POX_MONITORING_DIR_HOST={tmp_path / 'monitoring'}"
    try:
        done = make_run("container-run", f"POX_IMAGE={failing}", f"POX_CONTAINER_NAME={name}",
                        f"POX_PORT={free_port()}", folder, timeout=REQUEST_TIMEOUT_S)  # fmt: skip
        left = podman("container", "exists", name).returncode  # 1: no such container
    finally:
        podman("rm", "--force", name)
        podman("rmi", failing)
    assert done.returncode != 0 and "no-model-here" in done.stderr, done.stderr
    assert "the container is removed" in done.stderr and left == 1
    again = make_run("container-run", f"POX_CONTAINER_NAME={container.name}",
                     f"POX_PORT={free_port()}", folder, timeout=REQUEST_TIMEOUT_S)  # fmt: skip
    assert again.returncode != 0 and "already running" in again.stderr, again.stderr
    assert requests.get(f"{container.url}/readyz", timeout=REQUEST_TIMEOUT_S).ok


def test_the_image_is_lean_and_labelled(
    container: Container, image: str, champion: str, selected: dict
) -> None:
    for tool in ("gcc", "cc", "make", "git"):
        found = podman("exec", container.name, "sh", "-c", f"command -v {tool}")
        assert found.returncode != 0, f"{tool} is in the image: {found.stdout}"
    history = podman("image", "history", "--no-trunc", "--format", "{{.CreatedBy}}", image)
    assert "tini" in history.stdout and "build-essential" not in history.stdout
    labels = podman("image", "inspect", "--format", "{{json .Labels}}", image).stdout
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=PROJECT_ROOT).stdout.strip()  # fmt: skip
    for key, value in {
        "io.pox-pipeline.model": champion,
        "io.pox-pipeline.model.mlflow_run_id": selected["mlflow_run_id"],
        "io.pox-pipeline.model.registered_version": str(selected["registered_model_version"]),
        "org.opencontainers.image.revision": commit,
    }.items():
        assert f'"{key}":"{value}"' in labels, (key, labels)


def test_its_services_run_on_uvloop_and_httptools(container: Container) -> None:
    """The Bento ships uvloop and httptools (bentofile.yaml), so uvicorn picks them inside the
    container too, as tests/test_service_e2e.py checks for `make serve`."""
    maps = podman("exec", container.name, "sh", "-c", "cat /proc/[0-9]*/maps").stdout
    assert "/uvloop/loop." in maps and "/httptools/parser/parser." in maps


def test_sigterm_stops_it_within_the_grace_period(container: Container) -> None:
    """Last in this module: it stops the container. Were SIGTERM ignored, podman would wait the
    whole grace period before its SIGKILL."""
    started = time.monotonic()
    make("container-stop", f"POX_CONTAINER_NAME={container.name}",
         f"POX_STOP_TIMEOUT_S={STOP_LIMIT_S}")  # fmt: skip
    stopped_s = time.monotonic() - started
    print(f"\nmake container-stop: {stopped_s:.1f} s")
    assert stopped_s < STOP_LIMIT_S
    assert podman("container", "exists", container.name).returncode == 1  # stopped and removed
