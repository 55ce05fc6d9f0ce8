"""Stage `select`: choose the champion on its selection evidence, register it in the MLflow
Model Registry (alias ``select.alias``) and publish it to the BentoML model store.

The choice reads ``reports/eval/<name>/selection_metrics.json`` and nothing else: the out-of-fold
predictions over every non-test photo (or the validation split on a fixed split), so the test
split stays an unbiased estimate. The rule (:func:`one_standard_error_rule`): the best mean over
the folds, and every family within one standard error of it counts as as good; of those, the
cheapest to serve wins (floating-point operations per photo, counted on the model's graph: the
same on every machine, so the choice repeats). The winner's test metrics are read afterwards,
only to ship with the model as metadata. Both the registry and the BentoML store are
idempotent: re-running on unchanged inputs reuses the registered version and the saved
BentoML model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig

from pox_pipeline.common import paths
from pox_pipeline.common.config import stage_entry
from pox_pipeline.common.reporting import undefined
from pox_pipeline.common.temperature import IDENTITY_TEMPERATURE, NO_CALIBRATION
from pox_pipeline.models.inference import NO_TTA, flops_per_photo, load_keras_model
from pox_pipeline.release import registry
from pox_pipeline.release.publish import GuardPhotos, Release, publish, without_nulls
from pox_pipeline.training.tracking import git_commit, read_run_info, setup_mlflow


def read_selection_metrics(cfg: DictConfig, model_name: str) -> dict[str, Any]:
    """The validation metrics and threshold of one candidate: all that the choice may see."""
    path = paths.eval_dir(cfg, model_name) / paths.SELECTION_METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `evaluate@{model_name}` first")
    return json.loads(path.read_text())


def choose_champion(
    selection_metrics: Mapping[str, Mapping[str, Any]], metric: str, greater_is_better: bool
) -> str:
    """The candidate with the best validation ``metric``.

    Ties go to the candidate listed first (``models`` order), so the choice is
    deterministic. A candidate whose metric is undefined (null / nan) cannot win.
    """
    scored = []
    for order, (name, values) in enumerate(selection_metrics.items()):
        if metric not in values:
            raise KeyError(f"{name}: {paths.SELECTION_METRICS_FILE} has no metric {metric!r}")
        value = values[metric]
        if not undefined(value):
            scored.append((value if greater_is_better else -value, -order, name))
    if not scored:
        raise ValueError(f"no candidate has a defined validation {metric!r}")
    return max(scored)[2]


def one_standard_error_rule(
    selection_metrics: Mapping[str, Mapping[str, Any]], metric: str, greater_is_better: bool
) -> dict[str, dict[str, Any]]:
    """Each candidate's mean over the folds of ``metric`` (the metric itself on a fixed split),
    its standard error, and whether it lies within one standard error of the best: the
    families the evidence cannot tell apart from the best (Breiman's one-SE rule)."""
    table: dict[str, dict[str, Any]] = {}
    for name, values in selection_metrics.items():
        mean = values.get(f"{metric}_fold_mean", values.get(metric))
        se = values.get(f"{metric}_fold_se")
        table[name] = {"mean": mean, "se": se, "pooled": values.get(metric),
                       "eligible": False}  # fmt: skip
    best = choose_champion(
        {name: {metric: row["mean"]} for name, row in table.items()}, metric, greater_is_better
    )
    margin = table[best]["se"] or 0.0
    for row in table.values():
        if undefined(row["mean"]):
            continue
        gap = table[best]["mean"] - row["mean"] if greater_is_better else (
            row["mean"] - table[best]["mean"])  # fmt: skip
        row["eligible"] = gap <= margin
    return table


def cheapest(table: dict[str, dict[str, Any]], cfg: DictConfig) -> str:
    """The eligible candidate that costs the fewest floating-point operations per photo (the
    only one when a single candidate is eligible; ties go to ``models`` order). Records
    ``gflops`` per photo."""
    eligible = [name for name, row in table.items() if row["eligible"]]
    if len(eligible) == 1:
        return eligible[0]
    for name in eligible:
        model = load_keras_model(paths.model_file(cfg, name))
        tta = read_selection_metrics(cfg, name).get("tta", NO_TTA)
        table[name]["gflops"] = flops_per_photo(model, int(cfg.data.image_size), tta) / 1e9
    return min(eligible, key=lambda name: (table[name]["gflops"], eligible.index(name)))


RULE_WORDS = (
    "Candidates are compared on {metric} over out-of-fold predictions (the mean over the "
    "patient-grouped folds of the non-test photos, with its standard error). Every candidate "
    "within one standard error of the best is as good on this evidence; of those, the "
    "cheapest to serve (floating-point operations per photo, counted on the model's graph) "
    "is the champion."
)


def read_test_metrics(cfg: DictConfig, model_name: str) -> dict[str, Any]:
    """The winner's test metrics, read after the choice only to ship as metadata ({} if absent)."""
    path = paths.eval_dir(cfg, model_name) / paths.TEST_METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def inference_settings(selection_metrics: Mapping[str, Any]) -> dict[str, Any]:
    """How evaluate turned model outputs into the probabilities its threshold was set on:
    ``temperature`` and ``tta``. selection_metrics.json written before calibration and TTA existed
    has neither: T = 1 and no TTA, which is what that evaluation did."""
    return {
        "calibration": selection_metrics.get("calibration", NO_CALIBRATION),
        "temperature": float(selection_metrics.get("temperature", IDENTITY_TEMPERATURE)),
        "tta": selection_metrics.get("tta", NO_TTA),
    }


def data_metadata(cfg: DictConfig) -> dict[str, Any]:
    """What the service needs to know about the inputs and outputs of any champion."""
    return {
        "classes": list(cfg.data.classes),
        "positive_class": cfg.data.positive_class,
        "image_size": int(cfg.data.image_size),
        "resample": cfg.data.resample,
    }


def provenance(run_info: Mapping[str, Any]) -> dict[str, Any]:
    """What a trained model is and started from, from its run.json."""
    return {"architecture": run_info["architecture"], "weights": run_info["weights"] or "none"}


def select(cfg: DictConfig) -> dict[str, Any]:
    """Choose, register and publish the champion; writes and returns ``reports/select.json``
    and writes the champion's compared figures to ``reports/champion.json`` (DVC metrics)."""
    metric = cfg.select.metric
    selection_metrics = {name: read_selection_metrics(cfg, name) for name in cfg.models}
    table = one_standard_error_rule(selection_metrics, metric, bool(cfg.select.greater_is_better))
    winner = cheapest(table, cfg)
    candidates = {name: without_nulls(row) for name, row in table.items()}
    selection = {"metric": metric, "rule": RULE_WORDS.format(metric=metric),
                 "candidates": candidates}  # fmt: skip

    # From here on the choice is made; test metrics only travel with the model.
    chosen = selection_metrics[winner]
    test_metrics = read_test_metrics(cfg, winner)
    inference = inference_settings(chosen)
    run_info = read_run_info(cfg, winner)
    run_id = run_info["mlflow_run_id"]
    commit = git_commit()
    setup_mlflow(cfg)
    version = registry.register_champion(
        cfg,
        run_id,
        {
            "model_name": winner,
            "threshold": chosen["threshold"],
            "threshold_rule": chosen["threshold_rule"],
            **inference,
            f"val_{metric}": chosen[metric],
            "git_commit": commit,
        },
    )
    metadata = {
        **model_metadata(cfg, winner, chosen, test_metrics),
        **provenance(run_info),
        "mlflow_run_id": run_id,
        "mlflow_model_version": int(version.version),
        "registered_model_name": cfg.select.registered_model_name,
        "git_commit": commit,
        "selection": selection,
    }
    checked = paths.crosscheck_report(cfg, winner)
    if checked.is_file():  # absent when select runs outside the pipeline (no crosscheck stage)
        report = json.loads(checked.read_text())
        metadata["crosscheck"] = without_nulls({k: v for k, v in report.items()
                                                if k != "model_name"})  # fmt: skip
    model_file = paths.model_file(cfg, winner)
    release = Release(model_file, metadata, run_id, GuardPhotos.of_model(cfg, winner), cfg)
    bento_tag = publish(cfg, release)

    result = {
        "winner": winner,
        "metric": metric,
        "greater_is_better": bool(cfg.select.greater_is_better),
        "value": table[winner]["mean"],
        "candidates": table,
        "rule": selection["rule"],
        "threshold": chosen["threshold"],
        "threshold_rule": chosen["threshold_rule"],
        **inference,
        "mlflow_run_id": run_id,
        "registered_model_name": cfg.select.registered_model_name,
        "registered_model_version": int(version.version),
        "alias": cfg.select.alias,
        "bentoml_tag": bento_tag,
    }
    out = paths.select_report(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    champion = {"champion": winner, **read_dvc_metrics(cfg, winner)}
    paths.champion_metrics(cfg).write_text(json.dumps(champion, indent=2) + "\n")
    return result


def model_metadata(
    cfg: DictConfig, model_name: str, val: Mapping[str, Any], test: Mapping[str, Any]
) -> dict[str, Any]:
    """What a trained model's answers mean, from its evaluation: shared by ``select`` and the
    CLI's unpublished models, so both cards say the same."""
    points = [
        {"name": point["name"], "threshold": point["threshold"],
         "evidence": without_nulls(point), "test": without_nulls(on_test)}
        for point, on_test in zip(val.get("operating_points", []),
                                  test.get("operating_points", []), strict=True)
    ]  # fmt: skip
    return {
        **data_metadata(cfg),
        "threshold": val.get("threshold"),
        "threshold_rule": val.get("threshold_rule"),
        **inference_settings(val),
        "model_name": model_name,
        "selection_metrics": without_nulls(
            {k: v for k, v in val.items() if k != "operating_points"}
        ),
        "test_metrics": without_nulls({k: v for k, v in test.items() if k != "operating_points"}),
        "operating_points": points,
    }


def read_dvc_metrics(cfg: DictConfig, model_name: str) -> dict[str, Any]:
    """evaluate's few compared figures of one model ({} if absent), for select's DVC metrics."""
    path = paths.eval_dir(cfg, model_name) / paths.DVC_METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def run(cfg: DictConfig) -> None:
    result = select(cfg)
    print(
        f"champion: {result['winner']} ({result['metric']} {result['value']:.3f}, the cheapest "
        "within one standard error of the best), "
        f"threshold {result['threshold']}, temperature {result['temperature']:.3f}, "
        f"tta {result['tta']}, "
        f"{result['registered_model_name']} v{result['registered_model_version']} "
        f"@{result['alias']}, BentoML {result['bentoml_tag']}"
    )


main = stage_entry(run)

if __name__ == "__main__":
    main()
