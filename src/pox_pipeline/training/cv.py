"""Patient-grouped k-fold cross-validation: the protocol the published MSLD results use.

One command runs prepare -> train -> evaluate for every fold (and every seed) of every model,
then writes one summary table (mean +- std per metric) and logs it to MLflow. Unlike the DVC
stages it composes ``conf/`` directly, so Hydra group overrides work::

    python -m pox_pipeline.training.cv data=msld cv.folds=3 'cv.models=[cnn]' model.cnn.epochs=40

``cv.folds: 0`` repeats the fixed train/val/test split once per seed instead.

``main`` returns the mean over folds of the *validation* metric ``cv.objective``, so Hydra's
Optuna sweeper can optimise it (``-m hparams_search=cnn_optuna``, see conf/hparams_search/):
the test folds never steer a search.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import mlflow
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pox_pipeline.common import paths
from pox_pipeline.common.config import conf_entry
from pox_pipeline.training import tracking


def fold_config(cfg: DictConfig, fold: int, seed: int) -> DictConfig:
    """The pipeline config of one fold: its own data split, seed and output folders."""
    root = Path(cfg.cv.out_dir) / f"seed{seed}" / f"fold{fold}"
    return OmegaConf.merge(
        cfg,
        {
            "seed": seed,
            # the published protocol: fit on the fold's train split, early-stop on its val
            "train": {"refit": {"folds": 0}},
            "data": {"folds": cfg.cv.folds, "fold": fold,
                     "split_seed": seed if cfg.cv.resplit else cfg.data.split_seed},  # fmt: skip
            "paths": {
                "prepared_dir": str(Path(cfg.cv.work_dir) / f"seed{seed}" / f"fold{fold}"),
                "models_dir": str(root / "models"),
                "reports_dir": str(root / "reports"),
            },
        },
    )


def fold_runs(cfg: DictConfig) -> list[tuple[int, int]]:
    """(seed, fold) of every run: ``cv.folds`` < 2 is the fixed split, as fold 0."""
    folds = range(cfg.cv.folds) if cfg.cv.folds >= 2 else [0]
    return [(int(seed), fold) for seed in cfg.cv.seeds for fold in folds]


def mean_std(values: list[float | None], key: str) -> dict[str, float | None]:
    """``<key>_mean`` and (sample) ``<key>_std`` of the defined values (None = undefined)."""
    defined = [value for value in values if value is not None]
    return {
        f"{key}_mean": statistics.fmean(defined) if defined else None,
        f"{key}_std": statistics.stdev(defined) if len(defined) > 1 else 0.0,
    }


def summarise(per_fold: list[dict[str, Any]], metric_names: list[str]) -> dict[str, Any]:
    """Mean and std over folds and seeds of each test metric (``<metric>_mean``) and, for
    runs that carry their validation metrics under ``"val"``, of each validation metric
    (``val_<metric>_mean``): the test figures report, the validation ones steer a search."""
    summary: dict[str, Any] = {"n_runs": len(per_fold)}
    for name in metric_names:
        summary.update(mean_std([run.get(name) for run in per_fold], name))
    if any("val" in run for run in per_fold):
        for name in metric_names:
            values = [run.get("val", {}).get(name) for run in per_fold]
            summary.update(mean_std(values, f"val_{name}"))
    return summary


def markdown_table(summaries: dict[str, dict[str, Any]], metric_names: list[str]) -> str:
    header = "| model | runs | " + " | ".join(metric_names) + " | wall s |"
    rule = "|---" * (len(metric_names) + 3) + "|"
    rows = []
    for model, summary in summaries.items():
        cells = [
            "n/a"
            if summary[f"{m}_mean"] is None
            else f"{summary[f'{m}_mean']:.3f} +- {summary[f'{m}_std']:.3f}"
            for m in metric_names
        ]
        rows.append(
            f"| {model} | {summary['n_runs']} | " + " | ".join(cells)
            + f" | {summary['wall_seconds']:.0f} |"
        )
    return "\n".join([header, rule, *rows]) + "\n"


def cross_validate(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Run every fold x seed x model; return {model: summary} and write the summary files."""
    metric_names = list(cfg.cv.metrics)
    per_model: dict[str, list[dict[str, Any]]] = {name: [] for name in cfg.cv.models}
    wall: dict[str, float] = {name: 0.0 for name in cfg.cv.models}
    runs = fold_runs(cfg)
    parents: dict[str, str] = {}  # model -> its parent run, opened once its first fold is ready
    with tracking.parent_runs_closed_on_failure(parents):
        run_folds(cfg, runs, parents, per_model, wall)

    out_dir = Path(cfg.cv.out_dir)
    summaries = {
        name: {**summarise(runs, summary_metrics(cfg)), "wall_seconds": round(wall[name], 1)}
        for name, runs in per_model.items()
    }
    result = {"folds": cfg.cv.folds, "seeds": list(cfg.cv.seeds), "summaries": summaries,
              "runs": per_model}  # fmt: skip
    (out_dir / "summary.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    # Scalars only, per model: `dvc metrics show reports/cv/metrics.json` (or `dvc metrics
    # diff ... <file>`) shows it; dvc.yaml does not list it, since `dvc repro` never writes it.
    (out_dir / paths.DVC_METRICS_FILE).write_text(json.dumps(summaries, indent=2) + "\n")
    table = markdown_table(summaries, metric_names)
    (out_dir / "summary.md").write_text(table)
    for name, summary in summaries.items():
        tracking.finish_parent_run(parents[name], numeric(summary), out_dir / "summary.md")
    print(table)
    return summaries


def run_folds(
    cfg: DictConfig, runs: list[tuple[int, int]], parents: dict[str, str],
    per_model: dict[str, list[dict[str, Any]]], wall: dict[str, float],
) -> None:  # fmt: skip
    """Train and evaluate every model on every (seed, fold), filling ``per_model`` and
    ``wall``; each model's parent run is opened in ``parents`` once its first fold is ready."""
    from pox_pipeline.data.prepare import prepare
    from pox_pipeline.training.evaluate import evaluate
    from pox_pipeline.training.train import train

    metric_names = list(cfg.cv.metrics)
    # one step per fold and seed; quiet when output is not a terminal (logs, CI)
    for seed, fold in tqdm(runs, desc="cv", unit="fold", disable=None):
        fold_cfg = fold_config(cfg, fold, seed)
        prepare(fold_cfg)
        for name in cfg.cv.models:
            if name not in parents:
                parents[name] = start_parent(cfg, fold_cfg, name)
            started = time.perf_counter()
            info = train(fold_cfg, name, parent_run_id=parents[name])
            scores = evaluate(fold_cfg, name)
            test = scores["test"]
            wall[name] += time.perf_counter() - started
            mlflow.MlflowClient().set_tag(info["mlflow_run_id"], "cv_fold", f"{seed}/{fold}")
            per_model[name].append({"seed": seed, "fold": fold, **test, "val": scores["val"]})
            tqdm.write(
                f"cv {name} seed {seed} fold {fold}: "
                + ", ".join(f"{m} {test[m]:.3f}" for m in metric_names if test.get(m) is not None)
                + f" (validation {cfg.cv.objective} {scores['val'].get(cfg.cv.objective)})"
            )



def start_parent(cfg: DictConfig, first_fold: DictConfig, name: str) -> str:
    """The run ``cv-<model>`` that nests the model's fold runs and holds their mean/std. Its
    data tags are the first fold's but for the split: every fold splits the same data set."""
    tags = {"model_name": name, "protocol": f"cv{cfg.cv.folds}",
            **tracking.run_tags(first_fold, f"cv@{name}")}  # fmt: skip
    del tags["split_sha256"]
    return tracking.start_parent_run(cfg, f"cv-{name}", tags)


def numeric(summary: dict[str, Any]) -> dict[str, float]:
    """The defined numbers of a summary (an undefined mean is None, which MLflow cannot log)."""
    return {k: v for k, v in summary.items() if isinstance(v, (int, float))}


def summary_metrics(cfg: DictConfig) -> list[str]:
    """``cv.metrics`` plus ``cv.objective``: the objective is always summarised."""
    return list(dict.fromkeys([*cfg.cv.metrics, cfg.cv.objective]))


def in_optimising_sweep() -> bool:
    """True in a multirun whose sweeper uses the return value (Optuna, not the basic
    grid sweeper, which only enumerates)."""
    if not HydraConfig.initialized():
        return False
    hydra_cfg = HydraConfig.get()
    return hydra_cfg.mode == RunMode.MULTIRUN and "BasicSweeper" not in hydra_cfg.sweeper._target_


def check_objective(cfg: DictConfig) -> None:
    """An optimising sweep needs one number per trial, so exactly one model: fail before
    training rather than after the first trial."""
    models = list(cfg.cv.models)
    if in_optimising_sweep() and len(models) != 1:
        raise ValueError(
            f"a hyper-parameter sweep optimises one model's validation {cfg.cv.objective}, "
            f"but cv.models is {models}: set cv.models=[<model>] (conf/hparams_search/ does)"
        )


def objective(cfg: DictConfig, summaries: dict[str, dict[str, Any]]) -> float | None:
    """Mean over folds (and seeds) of the validation metric ``cv.objective`` of the only
    model in ``cv.models``; None when several models are compared (nothing single to
    optimise). Raises when the metric is undefined in every fold, so a sweep marks the
    trial failed instead of ranking it."""
    if len(summaries) != 1:
        return None
    [(name, summary)] = list(summaries.items())
    value = summary[f"val_{cfg.cv.objective}_mean"]
    if value is None:
        raise ValueError(f"{name}: validation {cfg.cv.objective} is undefined in every fold")
    return float(value)


@conf_entry
def main(cfg: DictConfig) -> float | None:
    """Cross-validate; return the mean validation ``cv.objective`` (what a sweep optimises)."""
    OmegaConf.resolve(cfg)
    check_objective(cfg)
    Path(cfg.cv.out_dir).mkdir(parents=True, exist_ok=True)
    value = objective(cfg, cross_validate(cfg))
    if value is not None:
        print(f"cv objective: mean validation {cfg.cv.objective} {value:.4f}")
    return value


if __name__ == "__main__":
    main()
