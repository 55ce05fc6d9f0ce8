"""Serve an ensemble of the cross-validation fold models.

``python -m pox_pipeline.training.cv ...`` leaves one trained and evaluated model per fold (and
seed) in ``cv.out_dir``. Run with the same overrides, this entry point averages one family's (or,
with a list in ``ensemble.model``, several families') fold models into a single Keras model
and, with ``ensemble.publish``, makes it the champion that the service serves::

    python -m pox_pipeline.training.cv data=msld data.image_size=96 'cv.models=[resnet]'
    python -m pox_pipeline.release.ensemble data=msld data.image_size=96 'cv.models=[resnet]'

Every choice sees validation numbers only, as in ``select``: the family (``ensemble.model:
auto`` takes the best mean validation ``select.metric``), each member's temperature (baked
into its output layer, so the averaged probabilities are the calibrated ones) and the
threshold (the mean of the members' validation-chosen thresholds). No image is held out from
every member, so the ensemble has no test estimate of its own: it ships the cross-validated
test metrics of its recipe, labelled as such.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import mlflow
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm import tqdm

from pox_pipeline.common import paths
from pox_pipeline.common.config import conf_entry
from pox_pipeline.common.temperature import IDENTITY_TEMPERATURE
from pox_pipeline.data.prepare import load_split
from pox_pipeline.models.inference import load_keras_model
from pox_pipeline.release import publish as publishing
from pox_pipeline.release import registry, select
from pox_pipeline.training import tracking
from pox_pipeline.training.cv import fold_config, fold_runs, mean_std, summarise

AUTO = "auto"
REPORT_FILE = "ensemble.json"
# Output activations whose logits a temperature can divide through the last Dense layer.
CALIBRATABLE_ACTIVATIONS = ("sigmoid", "softmax")


@dataclass(frozen=True)
class Member:
    """One fold model and what its own evaluation chose on its own validation split."""

    seed: int
    fold: int
    model_file: Path
    selection_metrics: dict[str, Any]
    test_metrics: dict[str, Any]
    run_info: dict[str, Any]


def read_members(cfg: DictConfig, model_name: str) -> list[Member]:
    """The fold models of ``model_name`` that the cv run with this config left behind."""
    members = []
    for seed, fold in fold_runs(cfg):
        fold_cfg = fold_config(cfg, fold, seed)
        eval_dir = paths.eval_dir(fold_cfg, model_name)
        model_file = paths.model_file(fold_cfg, model_name)
        needed = [
            model_file,
            eval_dir / paths.SELECTION_METRICS_FILE,
            eval_dir / paths.TEST_METRICS_FILE,
        ]
        missing = [str(path) for path in needed if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{model_name} seed {seed} fold {fold}: {', '.join(missing)} missing; run "
                "`python -m pox_pipeline.training.cv` with the same overrides first"
            )
        members.append(
            Member(
                seed=seed,
                fold=fold,
                model_file=model_file,
                selection_metrics=json.loads(needed[1].read_text()),
                test_metrics=json.loads(needed[2].read_text()),
                run_info=tracking.read_run_info(fold_cfg, model_name),
            )
        )
    return members


def choose_families(cfg: DictConfig, candidates: dict[str, list[Member]]) -> list[str]:
    """``ensemble.model``: one name or a list of names of ``cv.models`` (their fold models
    averaged together), or ``auto``: the one family with the best mean validation metric."""
    wanted = cfg.ensemble.model
    if wanted != AUTO:
        names = [str(name) for name in (wanted if isinstance(wanted, ListConfig) else [wanted])]
        unknown = [name for name in names if name not in candidates]
        if unknown or not names:
            raise ValueError(f"ensemble.model={names!r}: use names of cv.models {list(candidates)}")
        return names
    metric = str(cfg.select.metric)
    means = {
        name: {
            metric: mean_std([m.selection_metrics.get(metric) for m in members], metric)[
                f"{metric}_mean"
            ]
        }
        for name, members in candidates.items()
    }
    return [select.choose_champion(means, metric, bool(cfg.select.greater_is_better))]


def bake_temperature(model: keras.Model, temperature: float) -> keras.Model:
    """Divide the logits by ``temperature`` inside the model: the last layer is the Dense
    sigmoid/softmax head (inside the ``trainable`` part of a chained model), and
    ``act(W x + b) / T`` logits are ``act((W / T) x + b / T)``."""
    head = model.layers[-1]
    while isinstance(head, keras.Model):  # vgg16, colour_texture: frozen -> trainable chain
        head = head.layers[-1]
    activation = getattr(getattr(head, "activation", None), "__name__", None)
    if not isinstance(head, keras.layers.Dense) or activation not in CALIBRATABLE_ACTIVATIONS:
        raise ValueError(
            f"{model.name}: the last layer must be a Dense {CALIBRATABLE_ACTIVATIONS} head to "
            f"bake a temperature into, got {type(head).__name__} ({activation})"
        )
    if temperature != IDENTITY_TEMPERATURE:
        head.kernel.assign(head.kernel / temperature)
        head.bias.assign(head.bias / temperature)
    return model


def build_ensemble(members: list[keras.Model], image_size: int, name: str) -> keras.Model:
    """One model whose output is the mean of the members' (calibrated) probabilities."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    outputs = [
        keras.Model(member.input, member.output, name=f"member_{index}")(inputs)
        for index, member in enumerate(members)
    ]
    averaged = outputs[0] if len(outputs) == 1 else keras.layers.Average()(outputs)
    return keras.Model(inputs, averaged, name=name)


def ensemble_threshold(members: list[Member]) -> float | None:
    """The members' validation-chosen thresholds, averaged (None: multi-class argmax)."""
    thresholds = [m.selection_metrics.get("threshold") for m in members]
    if any(t is None for t in thresholds):
        return None
    return statistics.fmean(thresholds)


def load_member(member: Member) -> keras.Model:
    model = load_keras_model(member.model_file)
    temperature = float(member.selection_metrics.get("temperature", IDENTITY_TEMPERATURE))
    return bake_temperature(model, temperature)


def held_out_ensembles(
    cfg: DictConfig, members: list[Member], models: list[keras.Model], name: str
) -> dict[str, Any] | None:
    """When every member of a fold saw the same split (``cv.resplit: false``, or one seed) and
    a fold has several members (seeds, or families), each fold's members are an ensemble no
    image of that fold's test split trained: score it there, as ``evaluate`` scores one model.
    Returns per-fold metrics and their mean +- std (None otherwise)."""
    same_folds = not cfg.cv.resplit or len(cfg.cv.seeds) == 1
    if not same_folds or len(members) <= len({m.fold for m in members}):
        return None
    from pox_pipeline.training.evaluate import score_split, split_metrics

    per_fold = []
    folds = sorted({m.fold for m in members})
    for fold in tqdm(folds, desc="held-out ensembles", unit="fold", disable=None):
        group = [m for m in members if m.fold == fold]
        fold_models = [model for m, model in zip(members, models, strict=True) if m.fold == fold]
        model = build_ensemble(fold_models, int(cfg.data.image_size), name)
        scores = score_split(fold_config(cfg, fold, group[0].seed), model, "test")
        point = split_metrics(scores, ensemble_threshold(group), int(cfg.evaluate.ece_bins))
        per_fold.append(
            {"fold": fold, "members": len(group), "n_test": len(scores.labels), **point}
        )
    return {"folds": per_fold, **summarise(per_fold, list(cfg.cv.metrics))}


def member_photos(cfg: DictConfig, members: list[Member]) -> tuple[publishing.MemberPhotos, ...]:
    """Each member's guard photos: its training split (the reference) and photos it never
    trained on (the threshold): its own fold's test photos in a fold ensemble (every other
    member trained on them), the validation photos on one split (no member trained on them)."""
    held_out = "test" if cfg.cv.folds >= 2 else "val"
    photos = []
    for member in members:
        fold_cfg = fold_config(cfg, member.fold, member.seed)
        trained_on, held = (load_split(fold_cfg, split)[0] for split in ("train", held_out))
        source = f"seed {member.seed} fold {member.fold}'s {held_out} photos"
        photos.append(publishing.MemberPhotos(trained_on, held, source))
    return tuple(photos)


def publish(
    cfg: DictConfig, family: str, members: list[Member], model: keras.Model, report: dict[str, Any]
) -> dict[str, Any]:
    """Log the ensemble as an MLflow run, register it as the champion, save it to BentoML."""
    model_name = report["model_name"]
    tracking.setup_mlflow(cfg)
    tags = {"model_name": model_name, "architecture": report["architecture"],
            "protocol": report["protocol"], "git_commit": tracking.git_commit()}  # fmt: skip
    with mlflow.start_run(run_name=f"ensemble-{family}", tags=tags) as run:
        tracking.log_params(cfg)
        # MLflow keeps its `val_` prefix for the selection evidence: runs stay comparable
        for key, prefix in (("selection_metrics", "val"), ("cv_test_metrics", "cv_test"),
                            ("held_out_ensemble_metrics", "held_out_ensemble")):  # fmt: skip
            values = publishing.without_nulls(report[key] or {})
            mlflow.log_metrics({f"{prefix}_{key}": value for key, value in values.items()
                                if isinstance(value, (int, float))})  # fmt: skip
        mlflow.log_dict(report, REPORT_FILE)
        tracking.log_keras_model(model)
    version = registry.register_champion(
        cfg,
        run.info.run_id,
        {**tags, "threshold": report["threshold"], "members": len(members)},
    )
    metadata = {
        **select.data_metadata(cfg),
        "threshold": report["threshold"],
        "threshold_rule": report["threshold_rule"],
        "calibration": report["calibration"],
        "temperature": IDENTITY_TEMPERATURE,  # the members' temperatures are in the weights
        "tta": report["tta"],
        "architecture": report["architecture"],
        "model_name": model_name,
        "weights": report["weights"],
        "mlflow_run_id": run.info.run_id,
        "mlflow_model_version": int(version.version),
        "registered_model_name": cfg.select.registered_model_name,
        "git_commit": tags["git_commit"],
        "selection_metrics": publishing.without_nulls(report["selection_metrics"]),
        "cv_test_metrics": publishing.without_nulls(report["cv_test_metrics"]),
    }
    # the backends and the monitoring reference: the first member's split (skin photos of the
    # same data set); the guard: each member's own photos
    data_cfg = fold_config(cfg, members[0].fold, members[0].seed)
    photos = dataclasses.replace(
        publishing.GuardPhotos.of_model(data_cfg, None), members=member_photos(cfg, members)
    )
    release = publishing.Release(
        Path(report["model_file"]), metadata, run.info.run_id, photos, data_cfg
    )
    bento_tag = publishing.publish(cfg, release)
    return {"mlflow_run_id": run.info.run_id, "registered_model_version": int(version.version),
            "alias": cfg.select.alias, "bentoml_tag": bento_tag}  # fmt: skip


def make_ensemble(cfg: DictConfig) -> dict[str, Any]:
    """Build (and with ``ensemble.publish`` serve) the ensemble; returns the written report."""
    candidates = {name: read_members(cfg, name) for name in cfg.cv.models}
    families = choose_families(cfg, candidates)
    members = [member for name in families for member in candidates[name]]
    family = "+".join(families)
    model_name = f"{'-'.join(families)}-ensemble"
    keras_name = f"{'_'.join(families)}_ensemble"
    member_models = [load_member(m) for m in tqdm(members, desc="members", disable=None)]
    model = build_ensemble(member_models, int(cfg.data.image_size), keras_name)
    out_dir = Path(cfg.ensemble.out_dir) / family
    out_dir.mkdir(parents=True, exist_ok=True)
    model_file = out_dir / paths.MODEL_FILE
    model.save(model_file)

    metric_names = list(cfg.cv.metrics)
    first = members[0]
    rules = {m.selection_metrics.get("threshold_rule") for m in members}
    report: dict[str, Any] = {
        "model_name": model_name,
        "family": family,
        "members": [{"seed": m.seed, "fold": m.fold, "model_file": str(m.model_file),
                     "temperature": m.selection_metrics.get("temperature"),
                     "threshold": m.selection_metrics.get("threshold")}
                    for m in members],  # fmt: skip
        "architecture": f"mean of {len(members)} "
        + " + ".join(sorted({m.run_info["architecture"] for m in members})),
        "weights": first.run_info.get("weights") or "none",
        "protocol": f"cv{cfg.cv.folds} seeds {list(cfg.cv.seeds)}",
        "threshold": ensemble_threshold(members),
        "threshold_rule": f"mean of the members' ({', '.join(sorted(map(str, rules)))})",
        "calibration": f"per member ({first.selection_metrics.get('calibration')}), in the weights",
        "tta": first.selection_metrics.get("tta", "none"),
        "candidates": {name: summarise([m.selection_metrics for m in ms], [str(cfg.select.metric)])
                       for name, ms in candidates.items()},  # fmt: skip
        "selection_metrics": summarise([m.selection_metrics for m in members], metric_names),
        "cv_test_metrics": summarise([m.test_metrics for m in members], metric_names),
        # the same folds' test images, scored by each fold's ensemble of seed models
        "held_out_ensemble_metrics": held_out_ensembles(cfg, members, member_models, keras_name),
        "model_file": str(model_file),
    }
    if cfg.ensemble.publish:
        report.update(publish(cfg, family, members, model, report))
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


@conf_entry
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    report = make_ensemble(cfg)
    served = (
        f"champion {cfg.select.registered_model_name} v{report['registered_model_version']} "
        f"@{report['alias']}, BentoML {report['bentoml_tag']}"
        if cfg.ensemble.publish
        else "not published (ensemble.publish=false)"
    )
    val = report["selection_metrics"].get(f"{cfg.select.metric}_mean")
    held_out = report["held_out_ensemble_metrics"]
    if held_out is not None:
        for metric in cfg.cv.metrics:
            print(
                f"test {metric}: single models {report['cv_test_metrics'][f'{metric}_mean']:.3f}"
                f" +- {report['cv_test_metrics'][f'{metric}_std']:.3f}, each fold's ensemble "
                f"{held_out[f'{metric}_mean']:.3f} +- {held_out[f'{metric}_std']:.3f}"
            )
    print(
        f"{report['model_name']}: {len(report['members'])} members, threshold "
        f"{report['threshold']}, mean val {cfg.select.metric} {val}; {report['model_file']}; "
        f"{served}"
    )

if __name__ == "__main__":
    main()
