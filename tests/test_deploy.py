"""deploy/kubernetes.yaml, checked offline against what the image really is: its name from
``make container``, the port the Bento's params.yaml serves on, BentoML's probe routes and
user; and run as ``make container-run`` runs it (read-only, /tmp writable, non-root)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import yaml
from bentoml._internal.container.generate import DEFAULT_BENTO_ENVS
from bentoml._internal.server.base_app import BaseAppFactory

from pox_pipeline.config import project_root

PROJECT_ROOT = project_root()


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    documents = yaml.safe_load_all((PROJECT_ROOT / "deploy" / "kubernetes.yaml").read_text())
    return {document["kind"]: document for document in documents}


@pytest.fixture(scope="module")
def pod(manifests: dict[str, dict]) -> dict:
    return manifests["Deployment"]["spec"]["template"]["spec"]


def bentoml_system_routes() -> set[str]:
    """The paths BentoML's HTTP server answers itself (health probes, metrics)."""

    async def endpoint(_: object) -> None:  # the routes only need something to call
        return None

    app = SimpleNamespace(livez=endpoint, readyz=endpoint, metrics=endpoint)
    return {route.path for route in BaseAppFactory.get_system_routes(app)}


def test_the_image_is_the_one_make_container_builds(pod: dict) -> None:
    (container,) = pod["containers"]
    default_image = re.search(r"^IMAGE \?= (\S+)$", (PROJECT_ROOT / "Makefile").read_text(), re.M)
    assert container["image"] == f"{default_image[1]}:latest"


def test_probes_ask_bentomls_own_routes_on_the_served_port(
    manifests: dict[str, dict], pod: dict
) -> None:
    (container,) = pod["containers"]
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    (port,) = container["ports"]
    assert port["containerPort"] == params["serve"]["port"]
    routes = bentoml_system_routes()
    probes = {kind: container[kind]["httpGet"] for kind in
              ("startupProbe", "readinessProbe", "livenessProbe")}  # fmt: skip
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/livez"
    for probe in probes.values():
        assert probe["path"] in routes
        assert probe["port"] == port["name"]
    (service_port,) = manifests["Service"]["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]
    labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert manifests["Service"]["spec"]["selector"].items() <= labels.items()


def test_it_runs_as_the_images_user_on_a_read_only_root_with_tmp_writable(pod: dict) -> None:
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == DEFAULT_BENTO_ENVS["uid_gid"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    (mount,) = container["volumeMounts"]
    template = (PROJECT_ROOT / "deploy" / "bento.Containerfile.j2").read_text()
    home = re.search(r"^ENV BENTOML_HOME=(\S+)$", template, re.M)[1]  # written at start
    assert home.startswith(mount["mountPath"].rstrip("/") + "/")
    assert {volume["name"] for volume in pod["volumes"]} == {mount["name"]}
    assert "memory" in container["resources"]["limits"]
