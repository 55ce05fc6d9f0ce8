"""Team mode against real servers on 127.0.0.1: PostgreSQL and `mlflow server` with sign-in
(`pox_pipeline.ops.team_server`, as `make mlflow-server` starts them), the DVC pipeline of one small
model logging there, a local DVC remote, and a colleague's fresh clone that pulls instead of
training. The MLflow UI of that server is checked in Chromium; its runs-compare view is saved as
test-artifacts/team-runs-compare.png (the README's screenshot)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from helpers.browser import ARTIFACTS, requires_chromium
from helpers.dvc import copy_project, run, stages_run
from helpers.serve import free_port
from helpers.suite import TEST_IMAGE_SIZE
from pox_pipeline.common.config import compose, write_params
from pox_pipeline.common.params import project_root
from pox_pipeline.ops import team_server

PROJECT_ROOT = project_root()
MODEL = "cnn"
EXPERIMENT = "pox-pipeline"
REGISTERED = "pox-classifier"
ALIAS = "champion"
EXP_NAME = "team-exp"
ADMIN = "admin"
COPIED = ["conf", "src", "dvc.yaml", ".dvcignore", ".gitignore"]
# One small model on tiny synthetic data, passed to DVC's Hydra composition as -S overrides.
TINY = [
    f"models=[{MODEL}]",
    f"data.image_size={TEST_IMAGE_SIZE}",
    "model.cnn.padding=same",
    "model.cnn.epochs=1",
    f"synthetic.image_size={TEST_IMAGE_SIZE * 2}",
    "synthetic.patients_per_class=6",
    "evaluate.bootstrap.samples=20",
    "train.refit.folds=3",  # the k-fold + refit protocol at its smallest: 4 fits, not 6
]
WAIT_S = 60
UI_WAIT_S = 120  # MLflow's single-page UI on a busy 2-core machine


def _postgres_missing() -> bool:
    try:
        team_server.postgres_tool("initdb")
    except FileNotFoundError:
        return True
    return False


pytestmark = [
    pytest.mark.team,
    pytest.mark.skipif(
        _postgres_missing(),
        reason="PostgreSQL's initdb/pg_ctl are needed (Debian: apt-get install postgresql; "
        ".ci/run installs it)",
    ),
]


@pytest.fixture(scope="module")
def server() -> Iterator[dict[str, str]]:
    """PostgreSQL (a project-local cluster) + `mlflow server --app-name basic-auth` on a free
    port, the admin's password from the environment as `make mlflow-server` takes it."""
    # outside pytest's root-only temp folder: as root, the cluster runs as `postgres`
    state = Path(tempfile.mkdtemp(prefix="pox-team-"))
    password = secrets.token_urlsafe(16)
    cfg = compose(
        [f"team_server.state_dir={state}", f"team_server.port={free_port()}",
         "team_server.workers=1"]  # fmt: skip
    ).team_server
    try:
        with team_server.running(cfg, password) as started:
            yield {"url": started.url, "password": password, "state": str(state)}
    finally:
        shutil.rmtree(state, ignore_errors=True)


def client_env(server: dict[str, str], user: str = ADMIN, password: str | None = None) -> dict:
    """What a colleague sets to log to the team server: the URI and credentials."""
    return {
        "MLFLOW_TRACKING_URI": server["url"],
        "MLFLOW_TRACKING_USERNAME": user,
        "MLFLOW_TRACKING_PASSWORD": password or server["password"],
    }


@pytest.fixture
def as_user(monkeypatch: pytest.MonkeyPatch, server: dict[str, str]):
    """``as_user(name, password)``: this process's MLflow client signs in as that user."""

    def _sign_in(user: str = ADMIN, password: str | None = None):
        from mlflow import MlflowClient

        for key, value in client_env(server, user, password).items():
            monkeypatch.setenv(key, value)
        return MlflowClient(tracking_uri=server["url"], registry_uri=server["url"])

    return _sign_in


@pytest.fixture(scope="module")
def pipeline_env(server: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The stages' environment: the team server's URI and credentials, a BentoML store of
    their own, this venv's tools on PATH."""
    return {
        **os.environ,
        **client_env(server),
        "BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml-author")),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }


@pytest.fixture(scope="module")
def finished_run(pipeline_env: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An author's project: `dvc exp run` of one small model logging to the team server,
    committed and `dvc push`ed to a local remote (as README "Working as a team" says)."""
    root = tmp_path_factory.mktemp("author")
    copy_project(PROJECT_ROOT, COPIED, root)
    write_params(root / "params.yaml", overrides=TINY, conf_dir=root / "conf")
    remote = tmp_path_factory.mktemp("dvc-remote")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"],
                ["dvc", "config", "hydra.enabled", "true"],
                ["dvc", "remote", "add", "-d", "team", str(remote)],
                ["git", "add", "-A"], [*git, "commit", "-qm", "init"]):  # fmt: skip
        run(cmd, root, pipeline_env)
    commit = run(["git", "rev-parse", "HEAD"], root, pipeline_env).strip()
    output = run(
        ["dvc", "exp", "run", "-n", EXP_NAME, *(a for o in TINY for a in ("-S", o))],
        root, pipeline_env,
    )  # fmt: skip
    assert stages_run(output) == {"synthesize", "prepare", f"train@{MODEL}",
                                  f"evaluate@{MODEL}", f"crosscheck@{MODEL}", "select"}  # fmt: skip
    run(["git", "add", "-A"], root, pipeline_env)
    run([*git, "commit", "-qm", "a finished run"], root, pipeline_env)
    run(["dvc", "push"], root, pipeline_env)
    return {"root": root, "commit": commit, "remote": remote}


@pytest.fixture(scope="module")
def cv_summaries(server: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2-fold cross-validation of the small model logged to the team server."""
    from pox_pipeline.data.synthetic import synthesize
    from pox_pipeline.training.cv import cross_validate

    root = tmp_path_factory.mktemp("cv")
    cfg = compose([
        *TINY, f"paths.prepared_dir={root}/prepared", f"synthetic.out_dir={root}/synthetic",
        f"paths.models_dir={root}/models", f"paths.reports_dir={root}/reports",
        f"train.embedding_cache.dir={root}/cache", f"mlflow.tracking_uri={server['url']}",
        "cv.folds=2", f"cv.models=[{MODEL}]", f"cv.out_dir={root}/cv",
        f"cv.work_dir={root}/cv-work",
    ])  # fmt: skip
    synthesize(cfg)
    with pytest.MonkeyPatch.context() as patch:
        # mlflow.set_tracking_uri exports the URI: undone on the way out, for later tests
        for key, value in client_env(server).items():
            patch.setenv(key, value)
        return {"summaries": cross_validate(cfg), "cfg": cfg}


def manifest_sha256(root: Path) -> str:
    return hashlib.sha256((root / "datas" / "prepared" / "manifest.csv").read_bytes()).hexdigest()


def test_every_pipeline_output_is_cached_for_the_remote() -> None:
    """`dvc push` moves only cached outputs: a `cache: false` one would be missing from a
    colleague's pull, and `dvc status` there would never be clean."""
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind, []):
                if isinstance(entry, dict):
                    [(path, options)] = entry.items()
                    assert options.get("cache", True), f"{name}: {path} is not cached"


def test_only_the_registry_module_moves_the_alias() -> None:
    """select and ensemble publish through release/registry.py: one home for the alias."""
    movers = {
        path.name
        for path in (PROJECT_ROOT / "src" / "pox_pipeline").rglob("*.py")
        if "set_registered_model_alias" in path.read_text()
    }
    assert movers == {"registry.py"}


@pytest.mark.parametrize("key", ["backend_store_uri", "auth_database_uri"])
def test_a_database_uri_with_a_password_is_refused_before_anything_starts(
    key: str, tmp_path: Path
) -> None:
    """The tracking store's URI goes on `mlflow server`'s command line, which every user of the
    machine can read (ps): a password there is refused, and the message never repeats it."""
    cfg = compose([f"team_server.state_dir={tmp_path / 'state'}"]).team_server
    cfg.backend_store_uri = "postgresql+psycopg2://mlflow@db.example.org:5432/mlflow"
    cfg.auth_database_uri = "postgresql+psycopg2://mlflow@/mlflow_auth?host=/var/run/postgresql"
    cfg[key] = "postgresql+psycopg2://mlflow:s3cret%40pw@db.example.org:5432/mlflow"
    with pytest.raises(ValueError, match=f"team_server.{key} carries a password") as refused:
        with team_server.running(cfg, "admin-password"):
            pytest.fail("started")
    message = str(refused.value)
    assert "s3cret" not in message and "PGPASSFILE" in message
    assert "postgresql+psycopg2://mlflow@db.example.org:5432/mlflow" in message
    assert not (tmp_path / "state").exists()


def test_the_pipeline_logs_comparable_runs_to_the_team_server(
    finished_run: dict, server: dict[str, str], as_user
) -> None:
    client = as_user()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    [train_run] = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.dvc_exp = '{EXP_NAME}'"
    )
    root = finished_run["root"]
    assert train_run.info.run_name == f"train-{MODEL}"
    assert json.loads((root / "models" / MODEL / "run.json").read_text())["mlflow_run_id"] == (
        train_run.info.run_id
    )
    # the flattened config as params
    params = train_run.data.params
    assert params["model.cnn.epochs"] == "1" and params["data.image_size"] == str(TEST_IMAGE_SIZE)
    assert params["model_name"] == MODEL
    # the metrics of each split, as evaluate wrote them
    reports = root / "reports" / "eval" / MODEL
    # (MLflow keeps the `val_` prefix for the selection evidence: runs stay comparable)
    for prefix, name in (("val", "selection_metrics.json"), ("test", "test_metrics.json")):
        written = json.loads((reports / name).read_text())
        for metric in ("auc", "balanced_accuracy", "sensitivity"):
            if written[metric] is not None:
                logged = train_run.data.metrics[f"{prefix}_{metric}"]
                assert logged == pytest.approx(written[metric])
    # tags: model family, code, DVC stage and experiment, data set and its content
    tags = train_run.data.tags
    assert (tags["model_name"], tags["architecture"]) == (MODEL, "cnn")
    assert tags["git_commit"] == finished_run["commit"]
    assert (tags["dvc_stage"], tags["dvc_evaluate_stage"]) == (f"train@{MODEL}",
                                                               f"evaluate@{MODEL}")  # fmt: skip
    assert tags["dvc_exp"] == EXP_NAME
    assert tags["dataset"] == "datas/synthetic"  # as params.yaml names it: the same in a clone
    assert tags["split_sha256"] == manifest_sha256(root)
    assert re.fullmatch(r"[0-9a-f]{64}", tags["dataset_sha256"])
    # the model and reports went through the server's proxy into its artifact store
    logged = {artifact.path for artifact in client.list_artifacts(train_run.info.run_id)}
    assert {"eval", "config.yaml"} <= logged
    stored = Path(server["state"]) / "artifacts" / experiment.experiment_id
    assert any(stored.rglob("selection_metrics.json"))
    # the registered champion links to its run, as select reported
    selected = json.loads((root / "reports" / "select.json").read_text())
    champion = client.get_model_version_by_alias(REGISTERED, ALIAS)
    assert champion.run_id == train_run.info.run_id == selected["mlflow_run_id"]
    assert int(champion.version) == selected["registered_model_version"]
    assert champion.tags["model_name"] == MODEL


def test_the_server_state_is_owner_only(finished_run: dict, server: dict[str, str]) -> None:
    """basic_auth.ini, the secret key, the server log, the artifacts and the local cluster are
    written under umask 077, whatever this process's umask: no file or folder under the state
    folder is open to group or others (the cluster's socket is a socket in an owner-only
    folder)."""
    state = Path(server["state"])
    written = [state / name for name in (team_server.AUTH_CONFIG_FILE, "mlflow-server.log",
                                         team_server.SECRET_KEY_FILE)]  # fmt: skip
    assert all(path.is_file() for path in written)
    assert any(path.is_file() for path in (state / "artifacts").rglob("*"))
    assert (state / "postgres" / "data" / "PG_VERSION").is_file()
    open_to_others = [
        f"{path.relative_to(state)} {oct(mode)}"
        for path in state.rglob("*")
        if not path.is_socket() and (mode := stat.S_IMODE(path.lstat().st_mode)) & 0o077
    ]
    assert not open_to_others
    # as root, `postgres` must pass through the state folder to its cluster: 0711, no listing
    assert stat.S_IMODE(state.stat().st_mode) == (0o711 if os.geteuid() == 0 else 0o700)


def test_cross_validation_is_a_parent_run_with_one_child_per_fold(
    cv_summaries: dict, as_user
) -> None:
    client = as_user()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    [parent] = client.search_runs(
        [experiment.experiment_id], filter_string=f"attributes.run_name = 'cv-{MODEL}'"
    )
    nested = f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    children = client.search_runs([experiment.experiment_id], filter_string=nested)
    [seed] = cv_summaries["cfg"].cv.seeds
    assert sorted(run.data.tags["cv_fold"] for run in children) == [f"{seed}/0", f"{seed}/1"]
    assert all("test_auc" in run.data.metrics for run in children)
    summary = cv_summaries["summaries"][MODEL]
    for key in ("auc_mean", "auc_std", "val_auc_mean"):
        if summary[key] is not None:
            assert parent.data.metrics[key] == pytest.approx(summary[key])
    assert parent.info.status == "FINISHED" and parent.data.tags["protocol"] == "cv2"
    assert {run.data.tags["dataset_sha256"] for run in children} == {
        parent.data.tags["dataset_sha256"]
    }


def test_a_second_process_loads_the_champion_with_only_uri_and_credentials(
    finished_run: dict, server: dict[str, str], tmp_path: Path
) -> None:
    code = (
        "import mlflow, numpy as np\n"
        f"model = mlflow.pyfunc.load_model('models:/{REGISTERED}@{ALIAS}')\n"
        f"batch = np.zeros((2, {TEST_IMAGE_SIZE}, {TEST_IMAGE_SIZE}, 3), np.float32)\n"
        "print('scores', np.asarray(model.predict(batch)).shape)\n"
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **client_env(server),
           "TF_CPP_MIN_LOG_LEVEL": "2", "MLFLOW_DISABLE_TELEMETRY": "true"}  # fmt: skip
    output = run([sys.executable, "-c", code], tmp_path, env)
    assert "scores (2, 1)" in output


def test_sign_in_is_required_and_read_is_not_write(
    finished_run: dict, server: dict[str, str], as_user
) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.server.auth.permissions import RESOURCE_TYPE_EXPERIMENT

    search = f"{server['url']}/api/2.0/mlflow/experiments/search?max_results=10"
    assert requests.get(search, timeout=WAIT_S).status_code == 401
    assert requests.get(search, auth=(ADMIN, "wrong"), timeout=WAIT_S).status_code == 401
    assert requests.get(search, auth=(ADMIN, server["password"]), timeout=WAIT_S).ok

    admin = as_user()
    experiment = admin.get_experiment_by_name(EXPERIMENT)
    reader, reader_password = "reader", secrets.token_urlsafe(16)
    auth = AuthServiceClient(server["url"])
    auth.create_user(reader, reader_password)
    auth.grant_user_permission(reader, RESOURCE_TYPE_EXPERIMENT, experiment.experiment_id, "READ")
    champion = admin.get_model_version_by_alias(REGISTERED, ALIAS)

    as_reader = as_user(reader, reader_password)
    runs = as_reader.search_runs([experiment.experiment_id])
    assert champion.run_id in {run.info.run_id for run in runs}
    with pytest.raises(MlflowException) as refused:
        as_reader.create_model_version(REGISTERED, champion.source, champion.run_id)
    assert refused.value.error_code == "PERMISSION_DENIED"
    assert len(admin.search_model_versions(f"name = '{REGISTERED}'")) == int(champion.version)


def test_a_colleague_pulls_the_run_and_publishes_the_champion_without_training(
    finished_run: dict, server: dict[str, str], tmp_path: Path
) -> None:
    clone = tmp_path / "colleague"
    env = {**os.environ, **client_env(server), "BENTOML_HOME": str(tmp_path / "bentoml"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    run(["git", "clone", "-q", str(finished_run["root"]), str(clone)], tmp_path, env)
    assert not (clone / "models").exists()
    run(["dvc", "pull"], clone, env)
    assert (clone / "models" / MODEL / "model.keras").is_file()
    assert (clone / "reports" / "eval" / MODEL / "selection_metrics.json").is_file()
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone, env)
    assert stages_run(run(["dvc", "repro"], clone, env)) == set()

    # publishing is the select stage alone (README): the registry and a local BentoML store
    published = run(["dvc", "repro", "--force", "-s", "select"], clone, env)
    assert stages_run(published) == {"select"}
    selected = json.loads((clone / "reports" / "select.json").read_text())
    authored = json.loads((finished_run["root"] / "reports" / "select.json").read_text())
    assert selected["registered_model_version"] == authored["registered_model_version"]
    photo = next((clone / "datas" / "prepared" / "test").rglob("*.png"))
    output = run(["pox", "predict", "--json", str(photo)], clone, env)
    answer = json.loads(next(line for line in output.splitlines() if line.startswith("{")))
    assert answer["label"] in ("Monkeypox", "Others")


@pytest.mark.browser
@requires_chromium
def test_the_mlflow_ui_lists_the_runs_and_the_champion(
    browser, finished_run: dict, cv_summaries: dict, server: dict[str, str], as_user
) -> None:
    import base64
    from urllib.parse import quote

    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    token = base64.b64encode(f"{ADMIN}:{server['password']}".encode()).decode()
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd(
        "Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}}
    )

    def page_shows(url: str, *texts: str) -> None:
        browser.get(url)
        try:
            WebDriverWait(browser, UI_WAIT_S).until(
                lambda b: all(t in b.find_element(By.TAG_NAME, "body").text for t in texts)
            )
        except TimeoutException:
            ARTIFACTS.mkdir(exist_ok=True)
            browser.save_screenshot(str(ARTIFACTS / "team-ui-timeout.png"))
            shown = browser.find_element(By.TAG_NAME, "body").text
            pytest.fail(f"{url} never showed {texts}; it shows:\n{shown[:3000]}")

    client = as_user()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], filter_string="metrics.test_auc >= 0")
    page_shows(f"{server['url']}/#/experiments/{experiment.experiment_id}/runs",
               f"train-{MODEL}", f"cv-{MODEL}")  # fmt: skip
    page_shows(f"{server['url']}/#/models/{REGISTERED}", f"@ {ALIAS}")
    ids = quote(json.dumps([run.info.run_id for run in runs]))
    page_shows(
        f"{server['url']}/#/compare-runs?runs={ids}"
        f"&experiments={quote(json.dumps([experiment.experiment_id]))}",
        f"Comparing {len(runs)} Runs from 1 Experiment", "Run details",
    )
    # for the README: the assistant panel closed, only the params that differ, from the runs down
    for label in ("Close", "Parameters - Show diff only"):
        browser.find_element(By.CSS_SELECTOR, f"button[aria-label='{label}']").click()
    details = browser.find_element(By.XPATH, "//*[normalize-space(text())='Run details']")
    browser.execute_script("arguments[0].scrollIntoView()", details)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "team-runs-compare.png"))
