"""``pox validate``: a site checks the published champion on its own labelled photos before
going live, and gets a verdict: fit, with a threshold of its own, or not fit, with the way on.

The photos sit in class folders (``<folder>/<class>/*``, the champion's class names, case
ignored). Each goes through the service's own path (decoding limits, preprocessing, backend,
TTA, guard); a photo the guard refuses gets no label, so the figures are taken over the
photos that got one and the refused share is reported beside them. Binary models are scored
at the served threshold (``serve.threshold_override`` when set), with bootstrap intervals,
and a site threshold is found for ``--sensitivity-target``.

Then a verdict. The model is NOT FIT for the site when its AUC's bootstrap interval reaches 0.5
(no better than chance there) or when that threshold's specificity is below
``validate.min_specificity`` (it flags too many photos without the disease): a threshold only
trades one error for the other, so neither can be fixed by one. No threshold is recommended
then, no override file is written (a stale one is removed: a file ready to apply reads as
advice), and the report gives the command that adds the site's photos as a collection and
retrains. When fit, the threshold is recommended and written as the override
``serve.threshold_override`` that the service and the CLI honour. The published model is never
changed.
"""

from __future__ import annotations

import base64
import html
import json
import re
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from pox_pipeline.common.preprocess import ImageError, photo_files
from pox_pipeline.common.reporting import interval, interval_text, json_ready, undefined
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
AUC_CHANCE = 0.5  # an AUC interval that reaches it cannot rule out chance on this site
# `pox validate`'s exit status, as `pox monitor`'s: an error never reads as a verdict.
EXIT_FIT, EXIT_NOT_FIT, EXIT_NO_VERDICT = 0, 1, 2
# verdict["reasons"]: why the model is not fit
AUC_REACHES_CHANCE = "auc_interval_reaches_chance"
SPECIFICITY_BELOW_FLOOR = "specificity_below_floor"
# A folder Hydra's override grammar takes unquoted; any other is quoted for it.
HYDRA_PLAIN = re.compile(r"[\w./+-]+", re.ASCII)


@dataclass(frozen=True)
class LabelledPhoto:
    path: Path
    label: int


@dataclass(frozen=True)
class VerdictSettings:
    """``validate:`` of the composed params (conf/config.yaml says what each is)."""

    min_specificity: float
    retrain_data: str
    collection: str

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> VerdictSettings:
        settings = cls(float(cfg.validate.min_specificity), str(cfg.validate.retrain_data),
                       str(cfg.validate.collection))  # fmt: skip
        if not 0 <= settings.min_specificity <= 1:
            raise ValueError(f"validate.min_specificity={settings.min_specificity}: 0 to 1")
        return settings


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
    folder: Path,
) -> dict[str, Any]:
    """The site's figures and the verdict: refused share, metrics at the served threshold with
    intervals over the photos that got a label, the site threshold (binary models), whether
    the model is fit for the site and, when it is not, the command that retrains with it."""
    settings = VerdictSettings.from_cfg(cfg)
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
        "positive_class": policy.positive_class,
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
    site = None
    if policy.is_binary and len(np.unique(accepted.targets)) == 2:
        threshold = metrics.threshold_for_sensitivity(
            accepted.targets, accepted.positive_score, sensitivity_target
        )
        site = {"sensitivity_target": sensitivity_target, "threshold": threshold,
                **rates_with_ci(accepted, threshold, cfg)}  # fmt: skip
    verdict = judge(report["at_served_threshold"], site, settings.min_specificity)
    report["verdict"] = verdict
    if site is not None:  # only a fit model's threshold is advice
        report["recommended" if verdict["fit"] else "not_recommended"] = site
    if verdict["fit"] is False:
        renamed = {photo.path.relative_to(folder).parts[0]: policy.classes[photo.label]
                   for photo in photos}  # fmt: skip
        report["retrain"] = {
            "data": settings.retrain_data,
            "collection": settings.collection,
            "command": retrain_command(folder, settings, renamed),
        }
    verdict["text"] = verdict_lines(report)
    report["accepted"] = accepted
    return report


def judge(
    at_served: Mapping[str, Any], site: Mapping[str, Any] | None, min_specificity: float
) -> dict[str, Any]:
    """``fit``: True, False (with ``reasons``) or None when there is no verdict (the AUC is
    undefined: photos of one class). The AUC does not depend on the threshold, and the site
    threshold is the highest that keeps the sensitivity target, so no threshold keeping it has
    more specificity: when either fails, no threshold fixes it."""
    verdict: dict[str, Any] = {"fit": None, "reasons": [], "auc_chance": AUC_CHANCE,
                               "min_specificity": min_specificity}  # fmt: skip
    auc_bounds = interval(at_served, "auc")
    if undefined(at_served.get("auc")) or auc_bounds is None:
        return verdict
    if auc_bounds[0] <= AUC_CHANCE:
        verdict["reasons"].append(AUC_REACHES_CHANCE)
    if site is not None and site["specificity"] < min_specificity:
        verdict["reasons"].append(SPECIFICITY_BELOW_FLOOR)
    verdict["fit"] = not verdict["reasons"]
    return verdict


def exit_status(report: Mapping[str, Any]) -> int:
    return {True: EXIT_FIT, False: EXIT_NOT_FIT}.get(report["verdict"]["fit"], EXIT_NO_VERDICT)


def hydra_string(text: str) -> str:
    """``text`` as a value of a Hydra override: bare when its grammar allows, else in double
    quotes (a shell's single quotes then hold it as is), the quotes inside (and backslashes
    before a quote) escaped, and ``${`` kept from interpolating."""
    if HYDRA_PLAIN.fullmatch(text):
        return text
    escaped = re.sub(r'(\\*)"', lambda m: m[1] * 2 + '\\"', text.replace("${", "\\${"))
    escaped = re.sub(r"(\\+)$", lambda m: m[1] * 2, escaped)
    return f'"{escaped}"'


def retrain_command(folder: Path, settings: VerdictSettings, renamed: Mapping[str, str]) -> str:
    """The ``dvc exp run`` that trains on ``settings.retrain_data`` plus this site's photos as
    the collection ``data.sources.<collection>``, shell-quoted. Groups are near-duplicate
    clusters (``group_pattern: null``): a site's file names carry no patient ids to rely on.
    ``renamed``: class folder -> class; when a folder's name differs from its class, all of
    them go in the class map (a folder a class map leaves out is left out of the data)."""
    fields = [f"dir: {hydra_string(str(Path(folder).resolve()))}", "group_pattern: null"]
    if any(name != cls for name, cls in renamed.items()):
        pairs = ", ".join(f"{hydra_string(name)}: {hydra_string(cls)}"
                          for name, cls in sorted(renamed.items()))  # fmt: skip
        fields.append(f"class_map: {{{pairs}}}")
    source = f"+data.sources.{settings.collection}={{{', '.join(fields)}}}"
    return shlex.join(["dvc", "exp", "run", "-S", f"data={settings.retrain_data}", "-S", source])


def apply_command(threshold: float) -> str:
    return f"python -m pox_pipeline.common.config serve.threshold_override={threshold:.6f}"


def verdict_lines(report: Mapping[str, Any]) -> list[str]:
    """The verdict in plain words, as the terminal, validation.json and the HTML page give it."""
    verdict, served = report["verdict"], report["at_served_threshold"]
    auc = f"AUC {interval_text(served, 'auc')}"
    if verdict["fit"] is None:
        return ["Verdict: none. The AUC is undefined on the photos the guard accepted: a verdict "
                "needs labelled photos of every class."]  # fmt: skip
    if verdict["fit"]:
        site = report.get("recommended")
        where = "" if site is None else f" at threshold {site['threshold']:.6f}"
        rates = served if site is None else site  # multi-class: the served argmax rule
        lines = [f"Verdict: fit for this site{where}: sensitivity "
                 f"{interval_text(rates, 'sensitivity')}, specificity "
                 f"{interval_text(rates, 'specificity')} ({auc})."]  # fmt: skip
        if site is not None:
            lines += ["Apply it with:", f"  {apply_command(site['threshold'])}"]
        return lines
    lines = ["Verdict: NOT FIT for this site, and a threshold cannot fix it:"]
    if AUC_REACHES_CHANCE in verdict["reasons"]:
        lines.append(f"  - {auc}: the interval reaches {AUC_CHANCE}, so on these photos the "
                     "model may rank no better than chance.")  # fmt: skip
    if SPECIFICITY_BELOW_FLOOR in verdict["reasons"]:
        site = report["not_recommended"]
        lines.append(
            f"  - the threshold that keeps sensitivity >= {site['sensitivity_target']} "
            f"({site['threshold']:.6f}) has specificity {interval_text(site, 'specificity')}, "
            f"below the floor of {verdict['min_specificity']} (validate.min_specificity): it "
            f"flags {1 - site['specificity']:.0%} of the photos without {report['positive_class']}."
        )
    return [
        *lines,
        f"No threshold is recommended and no {OVERRIDE_FILE} is written.",
        "Add this site's labelled photos as a collection and retrain:",
        f"  {report['retrain']['command']}",
        "That run's leave-one-collection-out figures (each collection scored by a model "
        "trained without it) appear in `dvc metrics show` and in the model card.",
    ]


def write_report(report: dict[str, Any], out_dir: Path, ece_bins: int) -> list[Path]:
    """validation.json, the ROC and reliability figures, an HTML page showing them, and the
    threshold override when one is recommended (else an earlier run's is removed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    accepted: SplitScores = report.pop("accepted")
    figures = {name: out_dir / file for name, file in FIGURES.items()}
    is_positive = (accepted.labels == accepted.positive_index).astype(int)
    roc = metrics.roc_points(is_positive, accepted.positive_score)
    title = f"{report['model']}\nROC on this site's photos"
    plot_curve(roc["fpr"], roc["tpr"], ("false positive rate", "sensitivity"), title,
               figures["roc"], diagonal=True)  # fmt: skip
    bins = metrics.reliability_bins(*calibration_inputs(accepted), ece_bins)
    plot_reliability({"served probabilities": bins}, ("mean predicted probability",
                     "observed frequency"), "reliability on this site's photos",
                     figures["reliability"])  # fmt: skip
    written = [*figures.values()]
    (out_dir / REPORT_JSON).write_text(json.dumps(json_ready(report), indent=2) + "\n")
    written.append(out_dir / REPORT_JSON)
    override = out_dir / OVERRIDE_FILE
    if "recommended" in report:
        recommended = report["recommended"]
        override.write_text(
            f"# pox validate: the threshold that keeps sensitivity >= "
            f"{recommended['sensitivity_target']} on this site's {report['photos']} photos\n"
            f"# apply: {apply_command(recommended['threshold'])}\n"
            f"serve:\n  threshold_override: {recommended['threshold']:.6f}\n"
        )
        written.append(override)
    else:
        override.unlink(missing_ok=True)  # an earlier run's, ready to apply, would read as advice
    (out_dir / REPORT_HTML).write_text(render_html(report, figures))
    written.append(out_dir / REPORT_HTML)
    return written


def render_html(report: dict[str, Any], figures: dict[str, Path]) -> str:
    """One page: the verdict first, the figures at the served threshold and both plots."""
    served = report["at_served_threshold"]
    names = ("sensitivity", "specificity", "balanced_accuracy", "auc", "accuracy")
    rows = "".join(f"<tr><td>{n.replace('_', ' ')}</td><td>{interval_text(served, n)}</td></tr>"
                   for n in names if n in served)  # fmt: skip
    colour = {True: "#1a7f37", False: "#cf222e"}.get(report["verdict"]["fit"], "#9a6700")
    verdict = (
        f'<section style="border:3px solid {colour};padding:0.5em 1em;white-space:pre-wrap">'
        f"{html.escape(chr(10).join(report['verdict']['text']))}</section>"
    )
    images = "".join(
        f'<img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}">'
        for name, path in figures.items()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>pox validate</title></head>"
        f"<body><h1>{html.escape(report['model'])} on this site's photos</h1>{verdict}"
        f"<p>{report['photos']} photos; the guard refused {report['refused']} "
        f"({report['refused_share']:.1%}), which get no label and are left out below. "
        f"Threshold {report['threshold']} ({report['threshold_source']}).</p>"
        f"<table><tr><th>metric</th><th>value [95% interval]</th></tr>{rows}</table>"
        f"{images}</body></html>\n"
    )
