"""Patient-grouped k-fold cross-validation: the protocol the published MSLD results use.

One command runs prepare -> train -> evaluate for every fold (and every seed) of every model,
then writes one summary table (mean +- std per metric) and logs it to MLflow. Unlike the DVC
stages it composes ``conf/`` directly, so Hydra group overrides work::

    python -m pox_pipeline.cv data=msld cv.folds=3 'cv.models=[cnn]' model.cnn.epochs=40

``cv.folds: 0`` repeats the fixed train/val/test split once per seed instead.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import hydra
import mlflow
from omegaconf import DictConfig, OmegaConf

from pox_pipeline import tracking
from pox_pipeline.config import CONF_DIR, flatten


def fold_config(cfg: DictConfig, fold: int, seed: int) -> DictConfig:
    """The pipeline config of one fold: its own data split, seed and output folders."""
    root = Path(cfg.cv.out_dir) / f"seed{seed}" / f"fold{fold}"
    return OmegaConf.merge(
        cfg,
        {
            "seed": seed,
            "data": {"folds": cfg.cv.folds, "fold": fold},
            "paths": {
                "prepared_dir": str(Path(cfg.cv.work_dir) / f"seed{seed}" / f"fold{fold}"),
                "models_dir": str(root / "models"),
                "reports_dir": str(root / "reports"),
            },
        },
    )


def summarise(per_fold: list[dict[str, Any]], metric_names: list[str]) -> dict[str, Any]:
    """Mean and (sample) standard deviation of each test metric over folds and seeds."""
    summary: dict[str, Any] = {"n_runs": len(per_fold)}
    for name in metric_names:
        values = [run[name] for run in per_fold if run.get(name) is not None]
        summary[f"{name}_mean"] = statistics.fmean(values) if values else None
        summary[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
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
    from pox_pipeline.data import prepare
    from pox_pipeline.evaluate import evaluate
    from pox_pipeline.train import train

    folds = list(range(cfg.cv.folds)) if cfg.cv.folds >= 2 else [0]
    metric_names = list(cfg.cv.metrics)
    per_model: dict[str, list[dict[str, Any]]] = {name: [] for name in cfg.cv.models}
    wall: dict[str, float] = {name: 0.0 for name in cfg.cv.models}
    for seed in cfg.cv.seeds:
        for fold in folds:
            fold_cfg = fold_config(cfg, fold, seed)
            prepare(fold_cfg)
            for name in cfg.cv.models:
                started = time.perf_counter()
                info = train(fold_cfg, name)
                test = evaluate(fold_cfg, name)["test"]
                wall[name] += time.perf_counter() - started
                mlflow.MlflowClient().set_tag(info["mlflow_run_id"], "cv_fold", f"{seed}/{fold}")
                per_model[name].append({"seed": seed, "fold": fold, **test})
                print(
                    f"cv {name} seed {seed} fold {fold}: "
                    + ", ".join(f"{m} {test[m]:.3f}" for m in metric_names if test.get(m) is not None)
                )

    out_dir = Path(cfg.cv.out_dir)
    summaries = {
        name: {**summarise(runs, metric_names), "wall_seconds": round(wall[name], 1)}
        for name, runs in per_model.items()
    }
    result = {"folds": cfg.cv.folds, "seeds": list(cfg.cv.seeds), "summaries": summaries,
              "runs": per_model}  # fmt: skip
    (out_dir / "summary.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    table = markdown_table(summaries, metric_names)
    (out_dir / "summary.md").write_text(table)
    log_summary(cfg, summaries, out_dir)
    print(table)
    return summaries


def log_summary(cfg: DictConfig, summaries: dict[str, dict[str, Any]], out_dir: Path) -> None:
    """One MLflow run per model holding the cross-validated figures, for side-by-side compare."""
    tracking.setup_mlflow(cfg)
    for name, summary in summaries.items():
        with mlflow.start_run(run_name=f"cv-{name}"):
            mlflow.set_tags({"model_name": name, "protocol": f"cv{cfg.cv.folds}",
                             "git_commit": tracking.git_commit()})  # fmt: skip
            params = flatten(cfg)
            for start in range(0, len(params), 100):
                mlflow.log_params(dict(list(params.items())[start : start + 100]))
            mlflow.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            mlflow.log_artifact(str(out_dir / "summary.md"))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    Path(cfg.cv.out_dir).mkdir(parents=True, exist_ok=True)
    cross_validate(cfg)


if __name__ == "__main__":
    main()
