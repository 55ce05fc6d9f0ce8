"""Config composition: conf/ (Hydra) -> params.yaml (DVC) -> every stage.

DVC stages read the composed ``params.yaml``: that is what ``dvc exp run -S key=value``
rewrites (DVC composes conf/ with Hydra itself), so a stage reading conf/ directly would
miss the override. ``python -m pox_pipeline.common.config`` writes params.yaml with DVC's own
composition function, so the file is byte-identical to what DVC would write.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from pox_pipeline.common.params import (
    CONF_DIR_NAME,
    PARAMS_FILE,
    project_root,
    register_path_resolver,
)

# `${entry_command:}` and `${entry_doc:}` in conf/config.yaml's hydra.help: how the running
# entry point is started (`python -m pox_pipeline.training.cv`) and its docstring.
OmegaConf.register_new_resolver("entry_command", lambda: entry_command(), replace=True)
OmegaConf.register_new_resolver(
    "entry_doc", lambda: (getattr(sys.modules["__main__"], "__doc__", None) or "").strip(),
    replace=True,
)


def entry_command() -> str:
    """``python -m <module>`` of the running entry point (its script's name without -m)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return f"python -m {spec.name}" if spec else Path(sys.argv[0]).name


def default_conf_dir() -> Path:
    return project_root() / CONF_DIR_NAME


def compose(overrides: Sequence[str] = (), conf_dir: Path | None = None) -> DictConfig:
    """Compose conf/ with Hydra overrides and resolve interpolations, as DVC does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    conf_dir = conf_dir or default_conf_dir()
    register_path_resolver(conf_dir.parent)  # `${pox.abspath:...}` starts where conf/ sits
    with initialize_config_dir(str(conf_dir), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return cfg


def write_params(
    output: Path | None = None,
    overrides: Sequence[str] = (),
    conf_dir: Path | None = None,
) -> Path:
    """Write params.yaml (default: the project's) exactly as ``dvc exp run`` with Hydra
    composition would (DVC's plugins path is its repository root, conf/'s parent)."""
    from dvc.utils.hydra import compose_and_dump

    output = output or project_root() / PARAMS_FILE
    conf_dir = conf_dir or default_conf_dir()
    register_path_resolver(conf_dir.parent)
    compose_and_dump(output, str(conf_dir), None, "config", str(conf_dir.parent), list(overrides))
    return output


def flatten(cfg: DictConfig | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested config into dotted keys (MLflow params)."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, Any] = {}
    for key, value in container.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def stage_entry(func: Callable[[DictConfig], Any]) -> Callable[[], Any]:
    """A Hydra entry point whose primary config is the project's ``params.yaml``.

    Gives every stage Hydra's command line: ``python -m pox_pipeline.training.train model_name=cnn
    model.cnn.epochs=3``, ``--cfg job`` to print the config, ``--help``. params.yaml is handed
    to Hydra through its ConfigStore, not as a config directory: Hydra lists every folder of
    its config directory as a config group, and the project root holds .venv/ and the data.
    The stage runs in the project root, where the relative paths of params.yaml start (DVC
    runs it there too).
    """

    @functools.wraps(func)
    def main() -> Any:
        from hydra.core.config_store import ConfigStore

        try:
            root = project_root()
        except FileNotFoundError as err:
            raise SystemExit(str(err)) from None
        params = root / PARAMS_FILE
        if not params.is_file():
            raise SystemExit(
                f"{params} not found: `python -m pox_pipeline.common.config` composes it from "
                f"{CONF_DIR_NAME}/"
            )
        os.chdir(root)
        node = OmegaConf.load(params)
        entry = sys.modules["__main__"]
        node.hydra = {
            "help": {
                "app_name": entry_command(),
                "header": f"${{hydra.help.app_name}}: {(entry.__doc__ or '').strip()}\n\n"
                f"Reads {PARAMS_FILE} (composed from conf/); any key below can be overridden "
                "as key=value.",
                # no "Configuration groups" section: params.yaml is already composed
                "template": "${hydra.help.header}\n\n== Config ==\n$CONFIG\n${hydra.help.footer}",
            }
        }
        ConfigStore.instance().store(name="params", node=node)
        return hydra.main(version_base="1.3", config_path=None, config_name="params")(func)()

    return main


def conf_entry(func: Callable[[DictConfig], Any]) -> Callable[[], Any]:
    """A Hydra entry point over the project's conf/ (found when it runs, not at import)."""

    @functools.wraps(func)
    def main() -> Any:
        try:
            conf = default_conf_dir()
        except FileNotFoundError as err:
            raise SystemExit(str(err)) from None
        register_path_resolver(conf.parent)
        return hydra.main(version_base="1.3", config_path=str(conf), config_name="config")(func)()

    return main


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m pox_pipeline.common.config [key=value ...]``: recompose params.yaml."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m pox_pipeline.common.config",
        description=f"Compose {CONF_DIR_NAME}/ into {PARAMS_FILE}, as `dvc exp run -S` does "
        "(DVC's own Hydra composition), so that `dvc repro` runs with it.",
        epilog="examples: data=msld | 'models=[cnn,efficientnet_lite0]' | "
        "serve.threshold_override=0.25 | train.refit.folds=0",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="Hydra overrides: a config group (data=msld) or any key")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None,
                        help=f"write here instead of the project's {PARAMS_FILE}")  # fmt: skip
    args = parser.parse_args(argv)
    written = write_params(args.out, overrides=args.overrides)
    print(f"composed {CONF_DIR_NAME}/ -> {written}"
          + (f" with {args.overrides}" if args.overrides else ""))  # fmt: skip
    return written


if __name__ == "__main__":
    main()
