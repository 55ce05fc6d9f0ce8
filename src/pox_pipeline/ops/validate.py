"""``pox validate``: a site checks the published champion on its own labelled photos before
going live, and gets a threshold of its own.

The photos sit in class folders (``<folder>/<class>/*``, the champion's class names, case
ignored). Each goes through the service's own path (decoding limits, preprocessing, backend,
TTA, guard); a photo the guard refuses gets no label, so the figures are taken over the
photos that got one and the refused share is reported beside them. Binary models are scored
at the served threshold (``serve.threshold_override`` when set), with bootstrap intervals,
and a site threshold is recommended for ``--sensitivity-target``: written as the override
``serve.threshold_override`` that the service and the CLI honour. The published model is
never changed.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from pox_pipeline.common.preprocess import ImageError, photo_files
from pox_pipeline.common.reporting import interval_text, json_ready
from pox_pipeline.serving.policy import DecisionPolicy
from pox_pipeline.training import metrics
from pox_pipeline.training.evaluate import (
    SplitScores,
    calibration_inputs,
    plot_curve,
    plot_reliability,
    rates_with_ci,
    with_ci,
)

REPORT_JSON = "validation.json"
REPORT_HTML = "validation.html"
OVERRIDE_FILE = "threshold_override.yaml"
FIGURES = {"roc": "roc.png", "reliability": "reliability.png"}


@dataclass(frozen=True)
class LabelledPhoto:
    path: Path
    label: int


def labelled_photos(
    folder: Path, classes: Iterable[str], extensions: Sequence[str]
) -> list[LabelledPhoto]:
    """Every image under ``folder/<class>/`` (any depth), labelled by its class folder; a
    folder that names no class of the model is an error, not a silent skip."""
    by_name = {name.lower(): index for index, name in enumerate(classes)}
    folders = sorted(p for p in Path(folder).iterdir() if p.is_dir())
    unknown = [p.name for p in folders if p.name.lower() not in by_name]
    if unknown:
        raise ValueError(
            f"{folder}: folders {unknown} name no class of the model {list(classes)}; "
            "put each photo in a folder named after its class"
        )
    photos = [
        LabelledPhoto(path, by_name[class_dir.name.lower()])
        for class_dir in folders
        for path in photo_files(class_dir, extensions)
    ]
    if not photos:
        raise ValueError(f"no labelled photos under {folder}/<class>/")
    return photos


def score_photos(
    photos: list[LabelledPhoto],
    to_input: Callable[[Path], np.ndarray],
    outputs_with_ood_score: Callable[[np.ndarray], np.ndarray],
    batch_size: int,
) -> tuple[list[LabelledPhoto], np.ndarray, list[dict[str, str]]]:
    """Model outputs + OOD score (last column) of every readable photo, and the unreadable
    ones with their reasons (reported, not fatal)."""
    readable, rows, unreadable = [], [], []
    for start in range(0, len(photos), batch_size):
        inputs = []
        for photo in photos[start : start + batch_size]:
            try:
                inputs.append(to_input(photo.path))
            except ImageError as error:
                unreadable.append({"file": str(photo.path), "error": str(error)})
                continue
            readable.append(photo)
        if inputs:
            rows.append(outputs_with_ood_score(np.stack(inputs)))
    if not rows:
        raise ValueError("none of the photos could be read")
    return readable, np.concatenate(rows), unreadable


def validate(
    cfg: DictConfig,
    policy: DecisionPolicy,
    photos: list[LabelledPhoto],
    scored: np.ndarray,
    sensitivity_target: float,
) -> dict[str, Any]:
    """The site's figures: refused share, metrics at the served threshold with intervals over
    the photos that got a label and, for a binary model, the recommended site threshold."""
    outputs, ood_scores = scored[:, :-1], scored[:, -1]
    refused = ~np.isnan(ood_scores) & (ood_scores > 1.0)
    labels = np.array([photo.label for photo in photos])
    proba = policy.class_probabilities(outputs)
    positive_index = policy.classes.index(policy.positive_class)
    accepted = SplitScores([str(p.path) for p, r in zip(photos, refused, strict=True) if not r],
                           labels[~refused], proba[~refused], positive_index,
                           binary=policy.is_binary)  # fmt: skip
    report: dict[str, Any] = {
        "model": f"{policy.name}:{policy.version}",
        "photos": len(photos),
        "refused": int(refused.sum()),
        "refused_share": float(refused.mean()),
        "refused_by_class": {
            name: int(refused[labels == index].sum()) for index, name in enumerate(policy.classes)
        },
        "threshold": policy.threshold,
        "threshold_source": "override" if policy.published_threshold is not None else "published",
    }
    if len(accepted.labels) == 0:
        raise ValueError("the guard refused every photo: nothing to validate")
    report["at_served_threshold"] = with_ci(accepted, policy.threshold, cfg)
    if policy.is_binary and len(np.unique(accepted.targets)) == 2:
        threshold = metrics.threshold_for_sensitivity(
            accepted.targets, accepted.positive_score, sensitivity_target
        )
        report["recommended"] = {
            "sensitivity_target": sensitivity_target,
            "threshold": threshold,
            **rates_with_ci(accepted, threshold, cfg),
        }
    report["accepted"] = accepted
    return report


def write_report(report: dict[str, Any], out_dir: Path, ece_bins: int) -> list[Path]:
    """validation.json, the ROC and reliability figures, an HTML page showing them, and the
    threshold override (binary models)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    accepted: SplitScores = report.pop("accepted")
    figures = {name: out_dir / file for name, file in FIGURES.items()}
    is_positive = (accepted.labels == accepted.positive_index).astype(int)
    roc = metrics.roc_points(is_positive, accepted.positive_score)
    title = f"{report['model']}: ROC on this site's photos"
    plot_curve(roc["fpr"], roc["tpr"], ("false positive rate", "sensitivity"), title,
               figures["roc"], diagonal=True)  # fmt: skip
    bins = metrics.reliability_bins(*calibration_inputs(accepted), ece_bins)
    plot_reliability({"served probabilities": bins}, ("mean predicted probability",
                     "observed frequency"), "reliability on this site's photos",
                     figures["reliability"])  # fmt: skip
    written = [*figures.values()]
    (out_dir / REPORT_JSON).write_text(json.dumps(json_ready(report), indent=2) + "\n")
    written.append(out_dir / REPORT_JSON)
    if "recommended" in report:
        recommended = report["recommended"]
        (out_dir / OVERRIDE_FILE).write_text(
            f"# pox validate: the threshold that keeps sensitivity >= "
            f"{recommended['sensitivity_target']} on this site's {report['photos']} photos\n"
            f"# apply: python -m pox_pipeline.common.config serve.threshold_override="
            f"{recommended['threshold']:.6f}\n"
            f"serve:\n  threshold_override: {recommended['threshold']:.6f}\n"
        )
        written.append(out_dir / OVERRIDE_FILE)
    (out_dir / REPORT_HTML).write_text(render_html(report, figures))
    written.append(out_dir / REPORT_HTML)
    return written


def render_html(report: dict[str, Any], figures: dict[str, Path]) -> str:
    """One page: the figures at the served threshold, the recommendation and both plots."""
    served = report["at_served_threshold"]
    names = ("sensitivity", "specificity", "balanced_accuracy", "auc", "accuracy")
    rows = "".join(f"<tr><td>{n.replace('_', ' ')}</td><td>{interval_text(served, n)}</td></tr>"
                   for n in names if n in served)  # fmt: skip
    recommended = report.get("recommended")
    advice = (
        f"<p>Recommended site threshold for sensitivity &ge; "
        f"{recommended['sensitivity_target']}: <b>{recommended['threshold']:.4f}</b> "
        f"(sensitivity {interval_text(recommended, 'sensitivity')}, specificity "
        f"{interval_text(recommended, 'specificity')}). Apply it with "
        f"<code>python -m pox_pipeline.common.config serve.threshold_override="
        f"{recommended['threshold']:.6f}</code>.</p>"
        if recommended
        else ""
    )
    images = "".join(
        f'<img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}">'
        for name, path in figures.items()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>pox validate</title></head>"
        f"<body><h1>{html.escape(report['model'])} on this site's photos</h1>"
        f"<p>{report['photos']} photos; the guard refused {report['refused']} "
        f"({report['refused_share']:.1%}), which get no label and are left out below. "
        f"Threshold {report['threshold']} ({report['threshold_source']}).</p>"
        f"<table><tr><th>metric</th><th>value [95% interval]</th></tr>{rows}</table>"
        f"{advice}{images}</body></html>\n"
    )
