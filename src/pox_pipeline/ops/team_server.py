"""The team's MLflow tracking server (``make mlflow-server``): a PostgreSQL backend store, a
proxied artifact store and MLflow's basic-auth sign-in, in one command.

With ``team_server.backend_store_uri: null`` a project-local PostgreSQL cluster (Debian's
``postgresql`` package: ``initdb``/``pg_ctl``) lives in ``team_server.state_dir`` and listens
only on a unix socket in a folder no other user can enter; otherwise the URI names an existing
server. The admin password comes from the environment (``MLFLOW_AUTH_ADMIN_PASSWORD``, which
MLflow's sign-in app reads itself), never from a file: the sign-in config written into the
state folder holds no secret, and a database URI that carries a password is refused (it would
show on ``mlflow server``'s command line). Everything is written under umask 077: the state's
files are 0600, its folders 0700. Colleagues then only set ``MLFLOW_TRACKING_URI`` /
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` and the pipeline logs there::

    MLFLOW_AUTH_ADMIN_PASSWORD=... python -m pox_pipeline.ops.team_server team_server.port=5001
"""

from __future__ import annotations

import configparser
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import requests
from omegaconf import DictConfig

from pox_pipeline.common.config import conf_entry

# MLflow's own: used once, when the sign-in database is created with its admin user.
ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
# Flask-WTF's CSRF key of the sign-in app; generated once into the state folder if unset.
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
AUTH_CONFIG_ENV = "MLFLOW_AUTH_CONFIG_PATH"
AUTH_CONFIG_FILE = "basic_auth.ini"
SECRET_KEY_FILE = "flask_secret_key"
# PostgreSQL refuses to run as root: as root, the local cluster runs as Debian's `postgres`.
POSTGRES_OS_USER = "postgres"
POSTGRES_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
OWNER_ONLY = 0o700
OWNER_ONLY_FILE = 0o600
# What this server writes (the sign-in config, logs, the local cluster, local artifacts, by this
# process and the ones it starts) is for its own user only.
OWNER_ONLY_UMASK = 0o077


@contextlib.contextmanager
def owner_only_umask() -> Iterator[None]:
    """Files and folders created inside (also by processes started inside) are owner-only."""
    previous = os.umask(OWNER_ONLY_UMASK)
    try:
        yield
    finally:
        os.umask(previous)


def open_owner_only(path: Path, mode: str) -> IO:
    """``path`` opened; made 0600, also when an earlier run created it with a wider mode."""
    handle = path.open(mode)
    os.fchmod(handle.fileno(), OWNER_ONLY_FILE)
    return handle


def refuse_password(key: str, uri: str | None) -> None:
    """A database URI must not carry a password: ``mlflow server`` gets the tracking store's
    URI on its command line, which every user of the machine can read (``ps``), and the
    sign-in store's in its config file."""
    parts = urllib.parse.urlsplit(uri or "")
    if not parts.password:
        return
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    shown = f"{parts.scheme}://{parts.username}@{host}{port}{parts.path}"  # never the password
    raise ValueError(
        f"team_server.{key} carries a password (user:password@): it would show on the "
        f"server's command line to every user of this machine. Give it without one ({shown}) "
        "and put the password in ~/.pgpass or a file named by PGPASSFILE (mode 0600, lines "
        "host:port:database:user:password), or reach PostgreSQL over its unix socket "
        "(?host=/var/run/postgresql) with peer authentication"
    )


def postgres_tool(name: str) -> str:
    """A PostgreSQL server program (``initdb``, ``pg_ctl``): on PATH, else Debian's newest."""
    found = shutil.which(name) or next(
        (str(d / name) for d in POSTGRES_BIN_DIRS if (d / name).is_file()), None
    )
    if found is None:
        raise FileNotFoundError(
            f"{name} not found: install PostgreSQL (Debian: apt-get install postgresql) or set "
            "team_server.backend_store_uri to an existing server"
        )
    return found


@dataclass(frozen=True)
class LocalCluster:
    """A project-local PostgreSQL cluster reached only through its unix socket."""

    root: Path
    superuser: str
    databases: tuple[str, ...]

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    def uri(self, database: str) -> str:
        """SQLAlchemy URI of one database over the unix socket (no password: the socket's
        folder admits only its owner)."""
        return f"postgresql+psycopg2://{self.superuser}@/{database}?host={self.socket_dir}"

    def _as_owner(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", POSTGRES_OS_USER, "--", *cmd] if os.geteuid() == 0 else cmd

    def _run(self, cmd: list[str]) -> None:
        result = subprocess.run(self._as_owner(cmd), capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout}{result.stderr}")

    def start(self) -> None:
        """initdb on first use, start the server, create the databases that are missing."""
        for folder in (self.root, self.socket_dir):
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(OWNER_ONLY)
        if os.geteuid() == 0:
            owner = pwd.getpwnam(POSTGRES_OS_USER)
            for path in (self.root, self.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        if not (self.data_dir / "PG_VERSION").is_file():
            self._run([postgres_tool("initdb"), "-D", str(self.data_dir), "-U", self.superuser,
                       "-E", "UTF8", "--auth-local=trust", "--auth-host=reject"])  # fmt: skip
        # no TCP at all (listen_addresses empty): the socket folder is the only door
        options = f"-c listen_addresses='' -c unix_socket_directories='{self.socket_dir}'"
        self._run([postgres_tool("pg_ctl"), "-D", str(self.data_dir), "-l",
                   str(self.root / "postgres.log"), "-o", options, "-w", "start"])  # fmt: skip
        self._create_databases()

    def _create_databases(self) -> None:
        import psycopg2

        with contextlib.closing(
            psycopg2.connect(dbname="postgres", user=self.superuser, host=str(self.socket_dir))
        ) as conn:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cursor:
                for name in self.databases:
                    cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                    if cursor.fetchone() is None:
                        cursor.execute(f'CREATE DATABASE "{name}"')

    def stop(self) -> None:
        self._run([postgres_tool("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"])


def write_auth_config(path: Path, cfg: DictConfig, database_uri: str) -> Path:
    """MLflow's basic-auth config (no password: MLflow reads it from the environment)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser["mlflow"] = {
        "default_permission": cfg.default_permission,
        "database_uri": database_uri,
        "admin_username": cfg.admin_username,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    with open_owner_only(path, "w") as handle:
        parser.write(handle)
    return path


def secret_key(state_dir: Path) -> str:
    """``MLFLOW_FLASK_SERVER_SECRET_KEY`` if set, else one generated once and kept, owner-only,
    in the state folder (restarts and several workers must share it)."""
    if os.environ.get(SECRET_KEY_ENV):
        return os.environ[SECRET_KEY_ENV]
    path = state_dir / SECRET_KEY_FILE
    if not path.is_file():
        with open_owner_only(path, "w") as handle:
            handle.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def admin_password() -> str:
    password = os.environ.get(ADMIN_PASSWORD_ENV, "")
    if not password:
        raise SystemExit(
            f"set {ADMIN_PASSWORD_ENV} to the admin's password (used when the sign-in database "
            "is first created; keep it out of git: a password manager, a CI secret)"
        )
    return password


def server_command(cfg: DictConfig, backend_uri: str, artifacts: str) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_uri,
        "--serve-artifacts", "--artifacts-destination", artifacts,
        "--app-name", "basic-auth",
        "--host", str(cfg.host), "--port", str(cfg.port),
        "--workers", str(cfg.workers),
    ]  # fmt: skip


def wait_until_up(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    """Until the server answers (401 counts: sign-in is up); fail if it exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/health", timeout=5).status_code in (200, 401):
                return
        time.sleep(1)
    raise TimeoutError(f"mlflow server at {url} did not answer within {timeout_s} s")


@dataclass(frozen=True)
class TeamServer:
    url: str
    process: subprocess.Popen


@contextlib.contextmanager
def running(cfg: DictConfig, password: str, log_file: Path | None = None) -> Iterator[TeamServer]:
    """Start the store (the local cluster unless ``backend_store_uri`` is given) and ``mlflow
    server`` with sign-in, both under umask 077; yield it; stop both on exit."""
    refuse_password("backend_store_uri", cfg.backend_store_uri)
    refuse_password("auth_database_uri", cfg.auth_database_uri)
    state = Path(cfg.state_dir).resolve()
    cluster = None
    backend, auth_db = cfg.backend_store_uri, cfg.auth_database_uri
    if backend is not None and auth_db is None:
        raise ValueError("team_server.auth_database_uri is needed with an existing backend store")
    with owner_only_umask():  # mlflow server and the cluster inherit it
        state.mkdir(parents=True, exist_ok=True)
        state.chmod(OWNER_ONLY if os.geteuid() else 0o711)  # root: `postgres` must pass through
        if backend is None:
            cluster = LocalCluster(state / "postgres", str(cfg.local_postgres.superuser),
                                   tuple(cfg.local_postgres.databases))  # fmt: skip
            cluster.start()
            backend = cluster.uri(cfg.local_postgres.databases[0])
            auth_db = auth_db or cluster.uri(cfg.local_postgres.databases[1])
        artifacts = cfg.artifacts_destination or str(state / "artifacts")
        env = {
            **os.environ,
            AUTH_CONFIG_ENV: str(write_auth_config(state / AUTH_CONFIG_FILE, cfg, auth_db)),
            ADMIN_PASSWORD_ENV: password,
            SECRET_KEY_ENV: secret_key(state),
        }
        url = f"http://{cfg.host}:{cfg.port}"
        log = open_owner_only(log_file or state / "mlflow-server.log", "ab")
        process = subprocess.Popen(
            server_command(cfg, backend, artifacts), env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,  # its workers stop with it
        )  # fmt: skip
    try:
        wait_until_up(url, process, float(cfg.start_timeout_s))
        yield TeamServer(url, process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=float(cfg.stop_timeout_s))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()
        if cluster is not None:
            cluster.stop()


@conf_entry
def main(cfg: DictConfig) -> None:
    """Run the team's MLflow server until interrupted (Ctrl-C), then stop its database."""
    server_cfg = cfg.team_server
    with running(server_cfg, admin_password()) as server:
        print(f"MLflow server with sign-in on {server.url} "
              f"(log: {server_cfg.state_dir}/mlflow-server.log); Ctrl-C stops it")  # fmt: skip
        print(f"colleagues: export MLFLOW_TRACKING_URI={server.url} "
              "MLFLOW_TRACKING_USERNAME=<user> MLFLOW_TRACKING_PASSWORD=<password>")  # fmt: skip
        with contextlib.suppress(KeyboardInterrupt):
            server.process.wait()


if __name__ == "__main__":
    main()
