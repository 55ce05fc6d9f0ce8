"""deploy/, checked offline. kubernetes.yaml against what the image really is: its name from
``make container``, the port the Bento's params.yaml serves on, BentoML's probe routes and
user, the monitoring directory the image names; and run as ``make container-run`` runs it
(read-only, /tmp writable, non-root, monitoring on a volume). kubernetes-monitoring.yaml against
the Service and the Prometheus rules. The Makefile's container settings against an environment
that sets common names."""

from __future__ import annotations

import os
import re
import subprocess
from types import SimpleNamespace

import pytest
import yaml
from bentoml._internal.container.generate import DEFAULT_BENTO_ENVS
from bentoml._internal.server.base_app import BaseAppFactory

from pox_pipeline.common.params import project_root

PROJECT_ROOT = project_root()
DEPLOY = PROJECT_ROOT / "deploy"


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    documents = yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text())
    return {document["kind"]: document for document in documents}


@pytest.fixture(scope="module")
def monitoring_manifests() -> dict[str, dict]:
    documents = yaml.safe_load_all((DEPLOY / "kubernetes-monitoring.yaml").read_text())
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
    default_image = re.search(r"^POX_IMAGE \?= (\S+)$", (PROJECT_ROOT / "Makefile").read_text(),
                              re.M)  # fmt: skip
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
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    home = image_env("BENTOML_HOME")  # written at start
    assert home.startswith(mounts["tmp"].rstrip("/") + "/")
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes.keys() == mounts.keys() == {"tmp", "monitoring"}
    # uploads in flight (max_concurrency x max_request_bytes, twice) fit on disk, not in memory
    serve_cfg = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())["serve"]
    assert "medium" not in volumes["tmp"]["emptyDir"]
    in_flight = 2 * serve_cfg["max_concurrency"] * serve_cfg["max_request_bytes"]
    assert in_flight <= 2**30 * float(volumes["tmp"]["emptyDir"]["sizeLimit"].removesuffix("Gi"))
    assert "memory" in container["resources"]["limits"]


def image_env(name: str) -> str:
    """An ``ENV`` that deploy/bento.Containerfile.j2 sets in the image."""
    template = (DEPLOY / "bento.Containerfile.j2").read_text()
    return re.search(rf"^ENV {name}=(\S+)$", template, re.M)[1]


def test_monitoring_is_kept_on_a_claim_where_the_image_writes_it(
    manifests: dict[str, dict], pod: dict
) -> None:
    """The records survive a restart: the image's POX_MONITORING_DIR is a PersistentVolumeClaim,
    writable by the image's group, used by one pod at a time (records are named per worker, and
    a ReadWriteOnce volume is let go before the next pod mounts it)."""
    (container,) = pod["containers"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts["monitoring"] == image_env("POX_MONITORING_DIR")
    (volume,) = (v for v in pod["volumes"] if v["name"] == "monitoring")
    claim = manifests["PersistentVolumeClaim"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    assert pod["securityContext"]["fsGroup"] == DEFAULT_BENTO_ENVS["uid_gid"]
    deployment = manifests["Deployment"]["spec"]
    assert deployment["replicas"] == 1 and deployment["strategy"]["type"] == "Recreate"
    # make container-run hands the host folder to the same user
    script = (DEPLOY / "container.sh").read_text()
    assert int(re.search(r"^IMAGE_UID=(\d+)$", script, re.M)[1]) == DEFAULT_BENTO_ENVS["uid_gid"]


def test_the_service_monitor_scrapes_the_service_and_the_rules_are_the_checked_ones(
    manifests: dict[str, dict], monitoring_manifests: dict[str, dict]
) -> None:
    monitor = monitoring_manifests["ServiceMonitor"]["spec"]
    service = manifests["Service"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics" and "/metrics" in bentoml_system_routes()
    job = service["metadata"]["labels"][monitor["jobLabel"]]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "pox-alerts.yml").read_text())
    assert monitoring_manifests["PrometheusRule"]["spec"] == rules
    example = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (scrape,) = example["scrape_configs"]
    expressions = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert f'up{{job="{job}"}} == 0' in expressions and scrape["job_name"] == job


def make_dry_run(target: str, env: dict[str, str], *args: str) -> str:
    """What ``make -n target`` would run, in ``env`` (on top of a clean PATH and HOME)."""
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", target, *args], cwd=PROJECT_ROOT,
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/"), **env},
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout


def test_container_settings_cannot_be_hijacked_by_common_names() -> None:
    """CONTAINER_NAME, IMAGE, PORT... in the environment change nothing; the POX_-prefixed
    names are the documented overrides, from the environment or the command line."""
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    section = makefile[makefile.index("## container:") : makefile.index("container: install")]
    settings = re.findall(r"^(\w+) \?=", section, re.M)
    assert settings and all(name.startswith("POX_") for name in settings)
    common = {name.removeprefix("POX_"): "hijacked" for name in settings}
    run = make_dry_run("container-run", common)
    assert "hijacked" not in run
    assert "POX_CONTAINER_NAME='pox-classifier'" in run and "POX_PORT='3000'" in run
    assert f"POX_MONITORING_DIR_HOST='{PROJECT_ROOT}/monitoring'" in run
    chosen = make_dry_run("container-run", {"POX_CONTAINER_NAME": "mine"}, "POX_PORT=3001")
    assert "POX_CONTAINER_NAME='mine'" in chosen and "POX_PORT='3001'" in chosen
