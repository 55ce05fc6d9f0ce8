"""Config composition: conf/ (Hydra) -> params.yaml (DVC) -> every stage.

DVC stages read the composed ``params.yaml``: that is what ``dvc exp run -S key=value``
rewrites (DVC composes conf/ with Hydra itself), so a stage reading conf/ directly would
miss the override. ``python -m pox_pipeline.config`` writes params.yaml with DVC's own
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

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_ROOT / "conf"
PARAMS_FILE = "params.yaml"

# Telemetry off wherever the package runs (DVC, BentoML and MLflow all phone home by default).
for _var, _value in (
    ("DVC_NO_ANALYTICS", "1"),
    ("BENTOML_DO_NOT_TRACK", "true"),
    ("MLFLOW_DISABLE_TELEMETRY", "true"),
    ("TF_CPP_MIN_LOG_LEVEL", "2"),
):
    os.environ.setdefault(_var, _value)


# `${entry_doc:}` in conf/config.yaml's hydra.help: the running entry point's docstring.
OmegaConf.register_new_resolver(
    "entry_doc", lambda: (getattr(sys.modules["__main__"], "__doc__", None) or "").strip(),
    replace=True,
)


def compose(overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR) -> DictConfig:
    """Compose conf/ with Hydra overrides and resolve interpolations, as DVC does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(conf_dir), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return cfg


def write_params(
    output: Path = PROJECT_ROOT / PARAMS_FILE,
    overrides: Sequence[str] = (),
    conf_dir: Path = CONF_DIR,
) -> Path:
    """Write params.yaml exactly as ``dvc exp run`` with Hydra composition would."""
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(output, str(conf_dir), None, "config", "", list(overrides))
    return output


def load_params(path: Path | str = PARAMS_FILE, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a composed params file and apply dotlist overrides (for scripts and benchmarks)."""
    cfg = OmegaConf.load(path)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cfg


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
    """A Hydra entry point whose primary config is ``params.yaml`` in the working directory.

    Gives every stage Hydra's command line: ``python -m pox_pipeline.train model_name=cnn
    model.cnn.epochs=3``, ``--cfg job`` to print the config, ``--help``. params.yaml is handed
    to Hydra through its ConfigStore, not as a config directory: Hydra lists every folder of
    its config directory as a config group, and the project root holds .venv/ and the data.
    """

    @functools.wraps(func)
    def main() -> Any:
        from hydra.core.config_store import ConfigStore

        params = Path.cwd() / PARAMS_FILE
        if not params.is_file():
            raise SystemExit(
                f"{params} not found: run stages from the project root, where "
                "`python -m pox_pipeline.config` writes it"
            )
        node = OmegaConf.load(params)
        entry = sys.modules["__main__"]
        spec = getattr(entry, "__spec__", None)
        node.hydra = {
            "help": {
                "app_name": f"python -m {spec.name}" if spec else Path(sys.argv[0]).name,
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


if __name__ == "__main__":
    overrides = sys.argv[1:]
    written = write_params(overrides=overrides)
    print(f"composed conf/ -> {written.relative_to(PROJECT_ROOT)}" + (f" with {overrides}" if overrides else ""))
