"""Data outside the project is found in every workspace DVC makes: `dvc exp run --temp` and a
queue of experiments run side by side (`dvc queue start -j 2`) run in copies of the project
under .dvc/tmp/exps/, where a relative `../shared/...` names nothing.

A throw-away project with the real conf/ and hydra_plugins/ (so DVC's own composition of
`-S data=msld` is tested) and the real collections' places beside it (../shared/datasets/),
holding a few stand-in files. Its one stage, as prepare does, depends on `${data.raw_dir}` (DVC
checks that folder in its workspace) and finds the folder in the workspace's params.yaml
(the stage's code reads it there); it counts the files, a metric `dvc exp show` lists.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.dvc import copy_project, run
from pox_pipeline.common.config import write_params
from pox_pipeline.common.params import project_root

pytestmark = pytest.mark.long  # about a minute: `make test` starts this file early

PROJECT_ROOT = project_root()
COPIED = ["conf", "hydra_plugins", ".dvcignore", ".gitignore"]
# file counts of the two stand-in collections, so each experiment's metric says which it read
COLLECTIONS = {"msld": 2, "msid": 3}
QUEUE_TIMEOUT_S = 300

COUNT_STAGE = """\
stages:
  count:
    cmd: python count.py
    deps:
      - count.py
      - ${data.raw_dir}
    params:
      - data.raw_dir
    metrics:
      - count.json:
          cache: false
"""
COUNT_SCRIPT = """\
import json
from pathlib import Path

from pox_pipeline.common.params import load_params

folder = Path(load_params().data.raw_dir)
photos = [path for path in folder.rglob("*") if path.is_file()]
Path("count.json").write_text(json.dumps({"photos": len(photos)}))
"""


@pytest.fixture
def env() -> dict[str, str]:
    """This interpreter's environment first on PATH: DVC starts its queue workers as `dvc`."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
    }  # fmt: skip


@pytest.fixture
def project(tmp_path: Path, env: dict[str, str]) -> Iterator[Path]:
    """<tmp>/project, a git + DVC repository, with <tmp>/shared/datasets/{msld,msid} beside it.

    Stops the project's queue workers at the end, whatever the test left running."""
    for name, count in COLLECTIONS.items():
        for index in range(count):
            photo = tmp_path / "shared" / "datasets" / name / "Monkeypox" / f"{name}{index}.jpg"
            photo.parent.mkdir(parents=True, exist_ok=True)
            photo.write_bytes(b"stand-in")
    root = tmp_path / "project"
    root.mkdir()
    copy_project(PROJECT_ROOT, COPIED, root)
    (root / "dvc.yaml").write_text(COUNT_STAGE)
    (root / "count.py").write_text(COUNT_SCRIPT)
    write_params(root / "params.yaml", overrides=["data=msld"], conf_dir=root / "conf")
    run(["git", "init", "-q"], root, env)
    run(["dvc", "init", "-q"], root, env)
    run(["dvc", "config", "hydra.enabled", "true"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "init"], root, env)
    try:
        yield root
    finally:
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=root, env=env,
                       capture_output=True, timeout=120)  # fmt: skip


def exp_photos(root: Path, env: dict[str, str]) -> dict[str, str]:
    """Experiment name -> its `photos` metric, as `dvc exp show` lists them."""
    table = run(["dvc", "exp", "show", "--csv", "--no-fetch"], root, env)
    rows = csv.DictReader(io.StringIO(table))
    return {row["Experiment"]: row["photos"] for row in rows if row["Experiment"]}


def test_an_experiment_in_a_temporary_workspace_reads_data_beside_the_project(
    project: Path, env: dict[str, str]
) -> None:
    relative = ["-S", "data=msld", "-S", "data.raw_dir=../shared/datasets/msld"]
    failed = subprocess.run(["dvc", "exp", "run", "--temp", *relative], cwd=project, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    # the relative path, as conf/data/msld.yaml had it, resolves inside DVC's copy
    assert failed.returncode != 0
    assert "exps/standalone/shared/datasets/msld" in failed.stdout + failed.stderr

    run(["dvc", "exp", "run", "--temp", "-n", "temp-msld", "-S", "data=msld"], project, env)
    assert exp_photos(project, env)["temp-msld"] == str(COLLECTIONS["msld"])


def test_two_queued_experiments_run_side_by_side_and_are_listed(
    project: Path, env: dict[str, str]
) -> None:
    run(["dvc", "exp", "run", "--queue", "-n", "queued-msld", "-S", "data=msld"], project, env)
    other = "data.raw_dir=${pox.abspath:../shared/datasets/msid}"  # a folder given on the command
    run(["dvc", "exp", "run", "--queue", "-n", "queued-msid", "-S", "data=msld", "-S", other],
        project, env)  # fmt: skip
    run(["dvc", "queue", "start", "-j", "2"], project, env)

    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while True:
        status = run(["dvc", "queue", "status"], project, env)
        states = {line.split()[1]: line.split()[-1]
                  for line in status.splitlines() if "queued-" in line}  # fmt: skip
        if set(states) == {"queued-msld", "queued-msid"} and not (
            {"Queued", "Running"} & set(states.values())
        ):
            break
        assert time.monotonic() < deadline, f"the queue did not finish:\n{status}"
        time.sleep(2)
    assert states == {"queued-msld": "Success", "queued-msid": "Success"}, (
        status + "\n".join(run(["dvc", "queue", "logs", name], project, env)
                           for name, state in states.items() if state != "Success")
    )  # fmt: skip
    photos = exp_photos(project, env)
    assert photos["queued-msld"] == str(COLLECTIONS["msld"])
    assert photos["queued-msid"] == str(COLLECTIONS["msid"])
