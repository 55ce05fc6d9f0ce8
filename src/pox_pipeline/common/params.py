"""Finding and reading the composed params.yaml: what the service and every stage read.

Light on purpose (OmegaConf only, no Hydra or DVC): the service loads it at start.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PROJECT_MARKER = "dvc.yaml"
CONF_DIR_NAME = "conf"
PARAMS_FILE = "params.yaml"
PARAMS_ENV = "POX_PARAMS"  # another composed file for the service and pox (never a DVC stage)
# `${pox.abspath:../shared/datasets/msld}` in conf/: that path made absolute when conf/ is composed
PATH_RESOLVER = "pox.abspath"


def project_root(start: Path | None = None) -> Path:
    """The project this process works on: the nearest folder at or above ``start`` (default:
    the working directory) that holds dvc.yaml, as DVC itself finds its repository.

    Never derived from the package's own location: with a non-editable install, or a second
    checkout sharing one environment, that would be another project.
    """
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / PROJECT_MARKER).is_file():
            return folder
    raise FileNotFoundError(
        f"no {PROJECT_MARKER} in {start} or any folder above it: run inside the project "
        f"(the folder holding {PROJECT_MARKER}, {CONF_DIR_NAME}/ and {PARAMS_FILE})"
    )


def project_path(value: str | os.PathLike[str], root: Path | None = None) -> Path:
    """``value`` as an absolute path; a relative one starts at the project ``root`` (default:
    :func:`project_root`), never at the working directory.

    DVC runs experiments in copies of the project (``dvc exp run --temp``, ``--queue``: under
    .dvc/tmp/exps/), where a relative path that leaves the project (``../shared/...``) names a
    folder that is not there; its absolute form holds in every copy. So resolve such a path
    where conf/ is composed (``${pox.abspath:...}``): in a copy, :func:`project_root` is the copy.
    """
    path = Path(value).expanduser()
    return (path if path.is_absolute() else (root or project_root()) / path).resolve()


def register_path_resolver(root: Path) -> None:
    """Make ``${pox.abspath:<path>}`` resolve to :func:`project_path` of ``<path>`` from ``root``.

    Whoever composes conf/ registers it with the project it composes: ``common.config`` here,
    DVC's own composition (``dvc exp run -S``) through hydra_plugins/pox_resolvers.py.
    """
    root = root.resolve()
    OmegaConf.register_new_resolver(
        PATH_RESOLVER, lambda value: str(project_path(value, root)), replace=True
    )


def params_path() -> Path:
    """params.yaml of the project; a built Bento has no dvc.yaml, so there the working
    directory's (bentofile.yaml ships params.yaml at the Bento's root)."""
    try:
        return project_root() / PARAMS_FILE
    except FileNotFoundError:
        return Path.cwd() / PARAMS_FILE


def load_params(path: Path | str | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a composed params file (default: the project's) and apply dotlist overrides (for
    scripts and benchmarks)."""
    cfg = OmegaConf.load(path or params_path())
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cfg


def params_file() -> Path:
    """``$POX_PARAMS``, else :func:`params_path`: the params the service and ``pox`` run on, so
    a site can keep its own settings; DVC stages always read the project's."""
    return Path(os.environ.get(PARAMS_ENV) or params_path())


def load_params_file(overrides: Sequence[str] = ()) -> DictConfig:
    """:func:`params_file` loaded, or FileNotFoundError saying how to get one."""
    path = params_file()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found (from {Path.cwd()}): run in the project root (python -m "
            f"pox_pipeline.common.config composes it), or set {PARAMS_ENV} to a composed "
            "params file"
        )
    return load_params(path, overrides)
