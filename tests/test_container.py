"""The service's image, built and run as ``make container`` / ``make container-run`` /
``make container-stop`` do it (podman), answering as ``make serve`` does for the same champion:
a tiny model with its guard in the test BentoML store (the pipeline's champion would need
``make run`` first). The first build downloads the base system and the Bento's packages (about
ten minutes); later builds reuse their layers."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from serve_helpers import (
    PROJECT_ROOT,
    free_port,
    msld_samples,
    running_service,
    save_champion,
    skin_like_photos,
)

IMAGE = "pox-classifier-test"
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


def make(*args: str, timeout: float = BUILD_TIMEOUT_S) -> str:
    done = subprocess.run(
        ["make", "--no-print-directory", *args, "CONTAINER_ENGINE=podman", f"IMAGE={IMAGE}"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
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


@dataclass(frozen=True)
class Container:
    name: str
    url: str


@pytest.fixture(scope="module")
def photo() -> Path:
    return msld_samples(1)[0]


@pytest.fixture(scope="module")
def champion() -> str:
    return save_champion(guard_photos=skin_like_photos(24))


@pytest.fixture(scope="module")
def served_answer(champion: str, photo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``make serve``'s answer: the project's service with the params.yaml the Bento ships."""
    log = tmp_path_factory.mktemp("make-serve") / "server.log"
    with running_service(PROJECT_ROOT / "params.yaml", log) as url:
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
def container(image: str) -> Iterator[Container]:
    name, port = f"{IMAGE}-{os.getpid()}", free_port()
    try:
        started = time.monotonic()
        make("container-run", f"CONTAINER_NAME={name}", f"PORT={port}")
        print(f"\nmake container-run (start to /readyz 200): {time.monotonic() - started:.1f} s")
        yield Container(name, f"http://127.0.0.1:{port}")
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
    assert response.status_code == 400
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


def test_the_image_is_lean_and_labelled(container: Container, image: str, champion: str) -> None:
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
        "io.pox-pipeline.model.mlflow_run_id": "0123456789abcdef",
        "io.pox-pipeline.model.registered_version": "1",
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
    make("container-stop", f"CONTAINER_NAME={container.name}", f"STOP_TIMEOUT_S={STOP_LIMIT_S}")
    stopped_s = time.monotonic() - started
    print(f"\nmake container-stop: {stopped_s:.1f} s")
    assert stopped_s < STOP_LIMIT_S
    assert podman("container", "exists", container.name).returncode == 1  # stopped and removed
