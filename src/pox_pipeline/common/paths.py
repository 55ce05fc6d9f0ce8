"""Where the stages put their outputs, spelled once (dvc.yaml spells the same layout for DVC).

Every path starts at a ``paths.*`` key of the config, so a test or a cross-validation fold
that points ``paths.models_dir`` / ``paths.reports_dir`` elsewhere moves all of them.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

MODEL_FILE = "model.keras"
RUN_INFO_FILE = "run.json"
# train's out-of-fold predictions over the non-test photos (evaluate and select read them)
OOF_FILE = "oof.csv"
# evaluate's reports: every validation figure and the threshold, calibration and TTA that
# select ships with the champion; every test figure with its interval
SELECTION_METRICS_FILE = "selection_metrics.json"
TEST_METRICS_FILE = "test_metrics.json"
# DVC `metrics:`: the handful of figures `dvc metrics show` / `dvc exp show` compare
DVC_METRICS_FILE = "metrics.json"
# crosscheck's leave-one-collection-out report (select ships the champion's in its card)
CROSSCHECK_FILE = "crosscheck.json"
SELECT_REPORT_FILE = "select.json"
CHAMPION_FILE = "champion.json"


def source_dirs(data_cfg: DictConfig) -> dict[str, Path]:
    """Each collection's folder by name (``data.sources.<name>.dir``, relative to
    ``data.raw_dir`` unless absolute); without sources, ``data.raw_dir`` is the one."""
    raw_dir = Path(data_cfg.raw_dir)
    sources = data_cfg.get("sources") or {}
    if not sources:
        return {raw_dir.name or "data": raw_dir}
    return {str(name): raw_dir / str(source.dir)
            for name, source in sources.items() if source is not None and "dir" in source}


def model_dir(cfg: DictConfig, model_name: str) -> Path:
    return Path(cfg.paths.models_dir) / model_name


def model_file(cfg: DictConfig, model_name: str) -> Path:
    """The trained Keras model of ``train@<model_name>``."""
    return model_dir(cfg, model_name) / MODEL_FILE


def run_info_file(cfg: DictConfig, model_name: str) -> Path:
    """The MLflow run, architecture and weights of ``train@<model_name>``."""
    return model_dir(cfg, model_name) / RUN_INFO_FILE


def oof_file(cfg: DictConfig, model_name: str) -> Path:
    """``train@<model_name>``'s out-of-fold predictions (absent with ``train.refit.folds: 0``)."""
    return model_dir(cfg, model_name) / OOF_FILE


def train_report_dir(cfg: DictConfig, model_name: str) -> Path:
    """``train@<model_name>``'s history and curves."""
    return Path(cfg.paths.reports_dir) / "train" / model_name


def eval_dir(cfg: DictConfig, model_name: str) -> Path:
    """``evaluate@<model_name>``'s metrics, predictions, curves and figures."""
    return Path(cfg.paths.reports_dir) / "eval" / model_name


def crosscheck_dir(cfg: DictConfig, model_name: str) -> Path:
    """``crosscheck@<model_name>``'s leave-one-collection-out report and DVC metrics."""
    return Path(cfg.paths.reports_dir) / "crosscheck" / model_name


def crosscheck_report(cfg: DictConfig, model_name: str) -> Path:
    return crosscheck_dir(cfg, model_name) / CROSSCHECK_FILE


def select_report(cfg: DictConfig) -> Path:
    """select's whole report: the candidates, the choice, the registry and BentoML entries."""
    return Path(cfg.paths.reports_dir) / SELECT_REPORT_FILE


def champion_metrics(cfg: DictConfig) -> Path:
    """select's DVC metrics: the champion and its figures."""
    return Path(cfg.paths.reports_dir) / CHAMPION_FILE
