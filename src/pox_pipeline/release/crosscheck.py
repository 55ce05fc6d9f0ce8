"""The `crosscheck@<model>` stage: each collection judged by a model that never saw it.

Every other figure of the pipeline comes from folds of the training collections. A model
meets another collection the day a clinic uses it, so with two or more ``data.sources`` this
stage retrains the family once per collection without it (the same training loop, protocol
and threshold rule as the pipeline's model) and scores it on that collection: AUC, the
sensitivity and specificity at the threshold its own evidence chose (beside what that
evidence promised), and the share of the collection the guard, fitted on the other
collections as publish fits it, refuses. A group of near duplicates that spans collections
stays out of training when any of its photos is scored. With one collection there is nothing
to leave out, and the stage says so. ``select`` ships the champion's figures in its card.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pox_pipeline.common import paths
from pox_pipeline.common.config import stage_entry
from pox_pipeline.data.prepare import MANIFEST_NAME, SPLITS

# the figures of each left-out collection that `dvc metrics show` compares
COMPARED = ("auc", "sensitivity", "specificity", "balanced_accuracy", "guard_refused")
PROMISED = ("sensitivity", "specificity", "balanced_accuracy")


def manifest_rows(cfg: DictConfig) -> list[dict[str, str]]:
    with (Path(cfg.paths.prepared_dir) / MANIFEST_NAME).open(newline="") as handle:
        return list(csv.DictReader(handle))


def left_out_view(rows: list[dict[str, str]], collection: str, root: Path, prepared: Path) -> int:
    """Write a prepared set under ``root`` whose test split is all of ``collection`` beside the
    other collections' own test photos, and whose training photos are the other collections'
    train and val photos (as the pipeline's model has them), minus any group that reaches into
    ``collection``. The photos are linked, not copied. Returns the number of training photos."""
    root.mkdir(parents=True)
    for split in SPLITS:
        if (prepared / split).exists():
            (root / split).symlink_to((prepared / split).resolve(), target_is_directory=True)
    scored_groups = {row["group"] for row in rows if row["collection"] == collection}
    kept = []
    for row in rows:
        if row["collection"] == collection:
            kept.append({**row, "split": "test"})
        elif row["group"] not in scored_groups:
            kept.append(row)
    with (root / MANIFEST_NAME).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(sorted(kept, key=lambda r: (SPLITS.index(r["split"]), r["file"])))
    return sum(row["split"] != "test" for row in kept)


def guard_refusals(cfg: DictConfig, model_name: str, collection: str) -> float | None:
    """The share of ``collection``'s photos (in the view's test split) the guard refuses, the
    guard fitted on the training collections' photos as publish fits it (None: guard off)."""
    from pox_pipeline.data.prepare import load_split, split_collections_of
    from pox_pipeline.guard import ood
    from pox_pipeline.models.inference import load_keras_model
    from pox_pipeline.release.publish import GuardPhotos
    from pox_pipeline.release.settings import guard_config

    fit, settings = guard_config(cfg)
    if not fit:
        return None
    model = load_keras_model(paths.model_file(cfg, model_name))
    tta = str(cfg.evaluate.tta)
    guard, _ = GuardPhotos.of_model(cfg, model_name).fit(model, settings, tta)
    images, _, _ = load_split(cfg, "test")
    images = images[np.array(split_collections_of(cfg, "test")) == collection]
    scores = guard.scores(ood.features_of(model, images, settings, tta))
    return float((scores > 1).mean())


def check_collection(cfg: DictConfig, model_name: str, collection: str, work: Path,
                     parent_run_id: str | None) -> dict[str, Any]:  # fmt: skip
    """Train ``model_name`` without ``collection`` and score it there."""
    from pox_pipeline.training.evaluate import evaluate
    from pox_pipeline.training.train import train

    view = OmegaConf.merge(cfg, {"paths": {
        "prepared_dir": str(work / "prepared"), "models_dir": str(work / "models"),
        "reports_dir": str(work / "reports"),
    }})  # fmt: skip
    n_train = left_out_view(manifest_rows(cfg), collection, work / "prepared",
                            Path(cfg.paths.prepared_dir))  # fmt: skip
    train(view, model_name, parent_run_id=parent_run_id)
    figures = evaluate(view, model_name)
    evidence = figures["val"]
    by_collection = figures["test"].get("by_collection") or {collection: figures["test"]}
    scored = by_collection[collection]
    keep = ("auc", "auc_ci_low", "auc_ci_high", "sensitivity", "sensitivity_ci_low",
            "sensitivity_ci_high", "specificity", "specificity_ci_low", "specificity_ci_high",
            "balanced_accuracy", "balanced_accuracy_ci_low", "balanced_accuracy_ci_high")
    result = {
        "n": int(scored["n_test"]),
        "n_train": n_train,
        "threshold": evidence.get("threshold"),
        **{key: scored.get(key) for key in keep},
        # what the evidence on the other collections promised at that threshold
        "promised": {key: evidence.get(key) for key in PROMISED},
        "guard_refused": guard_refusals(view, model_name, collection),
        # the same model on the test photos of the collections it trained on
        "on_training_collections": {
            name: {key: figures.get(key) for key in ("n_test", *keep)}
            for name, figures in by_collection.items() if name != collection
        },
    }
    result["moved"] = {
        key: _difference(result.get(key), evidence.get(key)) for key in PROMISED
    }
    return result


def _difference(achieved: float | None, promised: float | None) -> float | None:
    if achieved is None or promised is None or math.isnan(achieved) or math.isnan(promised):
        return None
    return round(float(achieved) - float(promised), 4)


def crosscheck(cfg: DictConfig, model_name: str) -> dict[str, Any]:
    """Run the stage for one family; writes and returns ``reports/crosscheck/<name>/``'s report."""
    rows = manifest_rows(cfg)
    collections = list(dict.fromkeys(row["collection"] for row in rows))
    report: dict[str, Any] = {"model_name": model_name, "collections": {}}
    enabled = bool(cfg.crosscheck.enabled) and model_name in cfg.crosscheck.models
    if len(collections) < 2 or not enabled:
        report["note"] = (
            "one collection: nothing to leave out" if len(collections) < 2
            else "not run (crosscheck.enabled / crosscheck.models)"
        )
    else:
        report["collections"] = _run_each(cfg, model_name, collections)
    out = paths.crosscheck_dir(cfg, model_name)
    out.mkdir(parents=True, exist_ok=True)
    paths.crosscheck_report(cfg, model_name).write_text(json.dumps(report, indent=2) + "\n")
    compared = {name: {key: figures.get(key) for key in COMPARED}
                for name, figures in report["collections"].items()}  # fmt: skip
    (out / paths.DVC_METRICS_FILE).write_text(json.dumps(compared, indent=2) + "\n")
    return report


def _run_each(cfg: DictConfig, model_name: str, collections: list[str]) -> dict[str, Any]:
    """One MLflow run for the stage, each left-out training nested under it (as ``cv`` nests
    its folds), the figures logged as ``<collection>_<metric>``."""
    from pox_pipeline.training import tracking

    tags = {"model_name": model_name, "protocol": "leave-one-collection-out",
            **tracking.run_tags(cfg, f"crosscheck@{model_name}")}  # fmt: skip
    parent = tracking.start_parent_run(cfg, f"crosscheck-{model_name}", tags)
    results: dict[str, Any] = {}
    cache_root = Path(cfg.train.embedding_cache.dir)
    cache_root.mkdir(parents=True, exist_ok=True)
    with tracking.parent_runs_closed_on_failure({model_name: parent}):
        for collection in collections:
            with tempfile.TemporaryDirectory(dir=cache_root, prefix="crosscheck-") as work:
                results[collection] = check_collection(
                    cfg, model_name, collection, Path(work), parent
                )
    figures = {
        f"{collection}_{key}": float(value)
        for collection, result in results.items()
        for key, value in result.items()
        if isinstance(value, int | float) and math.isfinite(value)
    }
    tracking.finish_parent_run(parent, figures, None)
    return results


def summary(report: Mapping[str, Any]) -> str:
    """One line per left-out collection, for the terminal."""
    if not report["collections"]:
        return f"{report['model_name']}: {report.get('note', '')}"
    lines = []
    for name, figures in report["collections"].items():
        refused = figures.get("guard_refused")
        lines.append(
            f"{report['model_name']} on {name} (never seen, {figures['n']} photos): AUC "
            f"{figures['auc']:.3f} [{figures['auc_ci_low']:.3f}, {figures['auc_ci_high']:.3f}], "
            f"sensitivity {figures['sensitivity']:.2f} (promised "
            f"{figures['promised']['sensitivity']:.2f}), specificity "
            f"{figures['specificity']:.2f} (promised {figures['promised']['specificity']:.2f})"
            + ("" if refused is None else f", guard refused {refused:.0%}")
        )
    return "\n".join(lines)


def run(cfg: DictConfig) -> None:
    print(summary(crosscheck(cfg, str(cfg.model_name))))


main = stage_entry(run)

if __name__ == "__main__":
    main()
