"""The session's fixtures: configs composed from conf/ (as the pipeline does) with every path in
a temporary folder, and one small prepared synthetic data set per test session; the suite's
ordering and real-data rules. Settings the test modules share are in tests/helpers/suite.py
(test modules never import conftest)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

# Isolate the stores before bentoml / mlflow / keras are imported anywhere.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="pox-tests-"))
os.environ["BENTOML_HOME"] = str(_SESSION_HOME / "bentoml")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from helpers.suite import (  # noqa: E402
    MSLD_DIR,
    REQUIRE_SHARED_ENV,
    shared_required,
    tmp_overrides,
)
from pox_pipeline.common.config import compose  # noqa: E402

# Files with these marks take the suite's longest (an image build that mostly waits on the
# network, servers, real-data training, the pipeline): they run first, so that under `make
# test`'s `-n 2 --dist loadfile` shorter files fill the time around them, instead of one long
# file running alone at the end. Whole files move, so module-scoped fixtures are built once.
LONG_FIRST = ("container", "team", "msld", "long")


@pytest.hookimpl(trylast=True)  # after `-m` / `-k` deselection: only the tests that will run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    long_files_first(items)
    require_or_skip_msld(items)


def long_files_first(items: list[pytest.Item]) -> None:
    """Reorder ``items`` in place, file by file: those with a ``LONG_FIRST`` mark first, in its
    order; otherwise (and within a file) the collection order stays."""
    rank: dict[Path, int] = {}
    for item in items:
        marks = [LONG_FIRST.index(m.name) for m in item.iter_markers() if m.name in LONG_FIRST]
        rank[item.path] = min([rank.get(item.path, len(LONG_FIRST)), *marks])
    items.sort(key=lambda item: rank[item.path])  # stable


def require_or_skip_msld(items: list[pytest.Item]) -> None:
    needing = [item for item in items if item.get_closest_marker("msld")]
    if not needing or MSLD_DIR.is_dir():
        return
    where = f"real MSLD images not found at {MSLD_DIR} (../shared beside the project root)"
    if shared_required():
        raise pytest.UsageError(
            f"{where}, and {len(needing)} selected tests need them: CI (CI=true) and "
            f"{REQUIRE_SHARED_ENV}=1 fail instead of skipping them"
        )
    for item in needing:
        reason = f"{where}; on the team's machines and in CI it is there"
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_cfg("model.cnn.epochs=1", ...)``: conf/ composed, outputs under tmp_path."""

    def _make(*overrides: str) -> DictConfig:
        return compose([*tmp_overrides(tmp_path), *overrides])

    return _make


@pytest.fixture(scope="session")
def prepared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic data set, synthesized and prepared once per session (read-only for tests)."""
    from pox_pipeline.data.prepare import prepare
    from pox_pipeline.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("prepared")
    cfg = compose(tmp_overrides(root))
    synthesize(cfg)
    prepare(cfg)
    return root


@pytest.fixture
def prepared_cfg(prepared_root: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    """Like ``make_cfg`` but reading the session's prepared data; models/reports in tmp_path."""

    def _make(*overrides: str) -> DictConfig:
        return compose(
            [
                *tmp_overrides(tmp_path),
                f"paths.prepared_dir={prepared_root}/datas/prepared",
                f"synthetic.out_dir={prepared_root}/datas/synthetic",
                *overrides,
            ]
        )

    return _make
