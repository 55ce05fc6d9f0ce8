"""The model card of a published model, rendered from its BentoML metadata: what the model
is, how it was chosen and measured, and the decision policy (:mod:`pox_pipeline.serving.policy`) in
words. It only renders; answers come from :class:`policy.DecisionPolicy`.

``select`` and ``ensemble`` write it beside the model (so it ships in the Bento) and log it to
the model's MLflow run; the service shows it at ``/model-card``; ``pox model-card`` writes it.
It needs no TensorFlow: everything comes from the metadata that publishing stored.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pox_pipeline.common import paths
from pox_pipeline.common.reporting import interval, interval_text
from pox_pipeline.guard import ood
from pox_pipeline.serving import monitor, tflite
from pox_pipeline.serving.policy import DecisionPolicy, evidence_words, selection_evidence

MARKDOWN_FILE = "model_card.md"  # inside the BentoML model directory and the MLflow run
HTML_FILE = "model_card.html"
# The data set's own description, looked for in data.raw_dir in this order.
DATA_DOCS = ("MANIFEST.md", "README.md", "README.txt")
# Metrics shown, in this order (evaluate's names); others stay in the metadata.
METRICS = ("balanced_accuracy", "sensitivity", "specificity", "auc", "accuracy", "ece")

INTENDED_USE = [
    "Research and teaching: showing how a small skin-lesion classifier behaves, end to end.",
    "Screening-style triage of one close-up photo of a skin lesion into {classes}.",
    (
        "Not a diagnosis and not a medical device. A person worried about a rash should see a "
        "clinician, whatever the model says."
    ),
    (
        "Out of scope: photos that are not close-ups of skin lesions, other diseases, decisions "
        "about treatment or isolation."
    ),
]
KNOWN_LIMITS = [
    (
        "Small data: a few hundred photos (see the data description above); the intervals above "
        "are wide for that reason, and the model may have learned the look of the source's "
        "photos as much as the disease."
    ),
    (
        "Skin tones: the data records no skin tone; how the model does on darker or lighter skin "
        "has not been measured."
    ),
    (
        "Photos of the same patient look alike; the split keeps each patient in one split, but "
        "scores on new clinics, cameras and lighting may be lower."
    ),
    (
        "The out-of-distribution guard catches images far from the training photos (objects, "
        "screenshots, flat colours); a skin photo of another disease looks in-distribution and "
        "still gets one of the two labels."
    ),
]


# The site's serve.threshold_override, recorded in the card a site renders (never stored)
SITE_OVERRIDE = "site_threshold_override"
SITE_BACKEND = "site_backend"  # the site's serve.backend, likewise
BACKEND_METRICS = ("balanced_accuracy", "sensitivity", "specificity")


# ---------------------------------------------------------------------------- at publish time


def training_data_metadata(cfg: DictConfig) -> dict[str, Any]:
    """What the card says about the training data and the split, taken at publish time."""
    folders = paths.source_dirs(cfg.data)
    notes = [
        next(((folder / doc).read_text().strip() for doc in DATA_DOCS
              if (folder / doc).is_file()), "")
        for folder in folders.values()
    ]  # fmt: skip
    return {
        "training_data": {
            "source": ", ".join(str(folder) for folder in folders.values()),
            "notes": "\n\n".join(note for note in notes if note),
        },
        "split": {
            "train": float(cfg.data.split.train),
            "val": float(cfg.data.split.val),
            "test": float(cfg.data.split.test),
            "group_pattern": str(cfg.data.group_pattern),
            "folds": int(cfg.data.folds),
            "seed": int(cfg.data.split_seed),
        },
    }


def write_files(
    out_dir: Path, name: str, metadata: Mapping[str, Any], ui_path: str
) -> list[Path]:
    """Markdown and HTML cards in ``out_dir`` (the HTML linking back to the page at
    ``ui_path``); returns their paths."""
    paths = {"md": Path(out_dir) / MARKDOWN_FILE, "html": Path(out_dir) / HTML_FILE}
    for fmt, path in paths.items():
        path.write_text(render(name, metadata, fmt, ui_path))
    return list(paths.values())


# ---------------------------------------------------------------------------- content


@dataclass(frozen=True)
class Section:
    title: str
    paragraphs: Sequence[str] = ()
    bullets: Sequence[str] = ()
    table: Sequence[Sequence[str]] = ()  # first row: header
    preformatted: str = ""


def _percent(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.1%}"


def metric_rows(values: Mapping[str, Any], with_intervals: bool) -> list[list[str]]:
    """One row per known metric present: value, and its bootstrap interval if asked."""
    header = ["metric", "value"] + (["95% interval"] if with_intervals else [])
    rows = [header]
    for metric in METRICS:
        if metric in values:
            row = [metric.replace("_", " "), f"{float(values[metric]):.3f}"]
            if with_intervals:
                bounds = interval(values, metric)
                row.append("n/a" if bounds is None else f"{bounds[0]:.3f} - {bounds[1]:.3f}")
            rows.append(row)
    return rows


def cv_rows(values: Mapping[str, Any]) -> list[list[str]]:
    rows = [["metric", "mean +- std over folds"]]
    for metric in METRICS:
        if f"{metric}_mean" in values:
            mean, std = values[f"{metric}_mean"], values.get(f"{metric}_std", 0.0)
            rows.append([metric.replace("_", " "), f"{mean:.3f} +- {std:.3f}"])
    return rows


def operating_point_rows(points: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    header = ["rule", "threshold", "sensitivity (evidence)", "specificity (evidence)",
              "sensitivity (test)", "specificity (test)", "balanced accuracy (test)"]  # fmt: skip
    rows = [header]
    for point in points:
        evidence, test = point["evidence"], point.get("test", {})
        rows.append([
            str(point["name"]), f"{float(point['threshold']):.3f}",
            interval_text(evidence, "sensitivity"), interval_text(evidence, "specificity"),
            interval_text(test, "sensitivity"), interval_text(test, "specificity"),
            interval_text(test, "balanced_accuracy"),
        ])  # fmt: skip
    return rows


def selection_section(selection: Mapping[str, Any]) -> Section:
    """How the family was chosen: every candidate's cross-validated figure and the rule."""
    rows = [["model", f"{selection['metric']} (mean over folds)", "standard error",
             "within 1 SE of the best", "GFLOPs per photo"]]  # fmt: skip
    for name, row in selection["candidates"].items():
        cost = row.get("gflops")
        rows.append([
            name, f"{row['mean']:.3f}", "n/a" if row.get("se") is None else f"{row['se']:.3f}",
            "yes" if row["eligible"] else "no",
            "not counted" if cost is None else f"{cost:.2f}",
        ])  # fmt: skip
    return Section("How this model was chosen", paragraphs=[selection["rule"]], table=rows)


def with_site_override(
    metadata: Mapping[str, Any], threshold: float | None, backend: str | None = None
) -> dict[str, Any]:
    """The metadata a site's card is rendered from: ``serve.threshold_override`` and
    ``serve.backend`` recorded."""
    site = dict(metadata)
    if threshold is not None:
        site[SITE_OVERRIDE] = float(threshold)
    if backend is not None:
        site[SITE_BACKEND] = backend
    return site


def served_backend(metadata: Mapping[str, Any]) -> str:
    """The backend that answers: the site's ``serve.backend``, ``auto`` (the default) being the
    fastest published one."""
    backend = str(metadata.get(SITE_BACKEND, tflite.AUTO))
    return tflite.fastest(metadata.get("backends", {})) if backend == tflite.AUTO else backend


def _figure(values: Mapping[str, Any], name: str, fmt: str = ".3f") -> str:
    value = values.get(name)
    return "n/a" if value is None else format(float(value), fmt)


def backends_section(metadata: Mapping[str, Any]) -> Section:
    """The backends converted at publish, how each was measured, and which one answers."""
    check = metadata.get("backend_check", {})
    served = served_backend(metadata)
    words = (
        "Each TFLite backend was converted once, at publish, from this Keras model and stored "
        "beside it (the full-integer one's activation ranges set on "
        # models published before issue 28 named it calibration_photos
        f"{check.get('representative_photos', check.get('calibration_photos', '?'))} training "
        "photos); the service runs those bytes. Each was scored, as Keras, on the "
        f"{check.get('evidence_photos', '?')} photos the selection evidence came from and the "
        f"{check.get('test_photos', '?')} test photos, at the operating threshold with the "
        "temperature above. A backend is published only when, on the evidence photos, it "
        f"gives Keras's label to at least {_percent(check.get('min_label_agreement'))} of "
        "them and moves no probability by more than "
        f"{_figure(check, 'max_probability_difference')}. Milliseconds per photo (its TTA "
        "views in one batch) were measured at publish; serve.backend: auto serves the fastest "
        f"published. This card's service answers with {served}."
    )
    if selection_evidence(metadata).get("evidence") == "out_of_fold":
        words += (
            " This model was refitted on those evidence photos, so its figures there are "
            "in-sample: they show only that each backend answers as Keras does; the test "
            "figures are the ones to read."
        )
    header = ["backend", "published", "label agreement", "max |dp|", "ms per photo", "MB",
              *(f"{m.replace('_', ' ')} ({split})" for split in ("evidence", "test")
                for m in BACKEND_METRICS)]  # fmt: skip
    rows = [header]
    for name, row in metadata.get("backends", {}).items():
        figures = [_figure(row.get(split, {}), metric)
                   for split in ("evidence", "test") for metric in BACKEND_METRICS]  # fmt: skip
        size = row.get("size_bytes")
        rows.append([
            name + (" (served)" if name == served else ""),
            "yes" if row.get("published") else f"no{': ' + row['error'] if 'error' in row else ''}",
            _figure(row, "label_agreement"), _figure(row, "max_abs_probability_difference", ".4f"),
            _figure(row, "ms_per_photo", ".1f"), "-" if size is None else f"{size / 2**20:.2f}",
            *figures,
        ])  # fmt: skip
    return Section("Serving backends", paragraphs=[words], table=rows)


def model_section(name: str, metadata: Mapping[str, Any], policy: DecisionPolicy) -> Section:
    """Which model this is: its registry version, family, weights, classes and provenance."""
    version = metadata.get("mlflow_model_version", "?")
    return Section(
        "Model",
        table=[
            ["field", "value"],
            [
                "registered model",
                f"{metadata.get('registered_model_name', name)} v{version}",
            ],
            ["model", str(metadata.get("model_name", "?"))],
            ["architecture", str(metadata.get("architecture", "?"))],
            ["initial weights", str(metadata.get("weights", "?"))],
            [
                "classes",
                ", ".join(policy.classes) + f" (positive: {policy.positive_class})",
            ],
            ["input", f"RGB photo resized to {policy.image_size}x{policy.image_size}"],
            ["MLflow run", str(metadata.get("mlflow_run_id", "?"))],
            ["git commit", str(metadata.get("git_commit", "?"))],
        ],
    )


def data_sections(metadata: Mapping[str, Any]) -> list[Section]:
    """The training data, its licence as the data set describes it, and how it was split."""
    data = metadata.get("training_data", {})
    sections = [
        Section(
            "Training data and licence",
            paragraphs=[f"Source: {data.get('source', 'not recorded')}."],
            preformatted=data.get("notes", "") or "No description was found beside the data.",
        )
    ]
    split = metadata.get("split")
    if split:
        protocol = (
            f"Patient-grouped: every photo of one patient (the id matched by "
            f"{split['group_pattern']!r} in the file name) is in one split only. "
        )
        if split["folds"] >= 2:
            protocol += f"{split['folds']}-fold cross-validation"
        else:
            protocol += (
                f"Train {split['train']:.0%} / validation {split['val']:.0%} / test "
                f"{split['test']:.0%} of the photos"
            )
        protocol += (
            f", split seed {split['seed']}. The threshold, calibration and model choice "
            "saw validation photos only; the test photos were scored once."
        )
        sections.append(Section("Split protocol", paragraphs=[protocol]))
    return sections


def metric_sections(metadata: Mapping[str, Any]) -> list[Section]:
    """The figures: on the selection evidence, on the test photos, and an ensemble's
    cross-validated ones."""
    evidence = selection_evidence(metadata)
    sections = [
        Section(
            "Selection evidence",
            paragraphs=[
                f"At the operating threshold, on {evidence_words(evidence)}, "
                "with percentile bootstrap intervals."
            ],
            table=metric_rows(evidence, with_intervals=True),
        )
    ]
    if metadata.get("test_metrics"):
        sections.append(
            Section(
                "Test metrics",
                paragraphs=[
                    (
                        "Held-out test photos "
                        f"(n = {metadata['test_metrics'].get('n_test', '?')}), "
                        "with percentile bootstrap intervals."
                    )
                ],
                table=metric_rows(metadata["test_metrics"], with_intervals=True),
            )
        )
    for name, figures in metadata.get("test_metrics", {}).get("by_collection", {}).items():
        sections.append(
            Section(
                f"Test metrics: {name}",
                paragraphs=[f"The test photos of collection {name} (n = "
                            f"{figures.get('n_test', '?')}), at the same threshold."],
                table=metric_rows(figures, with_intervals=True),
            )
        )  # fmt: skip
    if metadata.get("cv_test_metrics"):
        sections.append(
            Section(
                "Cross-validated test metrics",
                paragraphs=[
                    (
                        "The ensemble's members, each on its own fold's test photos (no photo is "
                        "held out from every member, so the ensemble has no test score of its own)."
                    )
                ],
                table=cv_rows(metadata["cv_test_metrics"]),
            )
        )
    if "crosscheck" in metadata:
        sections.append(crosscheck_section(metadata["crosscheck"]))
    return sections


def crosscheck_section(crosscheck: Mapping[str, Any]) -> Section:
    """Leave-one-collection-out: the figure a new clinic's photos are likelier to resemble."""
    collections = crosscheck.get("collections") or {}
    if not collections:
        return Section("On a collection it never saw", paragraphs=[
            f"Not measured: {crosscheck.get('note', 'no report')}. Every figure above comes "
            "from photos of the collection(s) the model trained on; expect less on photos "
            "taken elsewhere."
        ])  # fmt: skip
    header = ["left out", "photos", "AUC", "sensitivity (promised)", "specificity (promised)",
              "guard refused", "AUC on the test photos of the rest"]  # fmt: skip
    rows = [header]
    for name, figures in collections.items():
        promised = figures.get("promised", {})
        refused = figures.get("guard_refused")
        rows.append([
            name, str(figures.get("n", "?")), interval_text(figures, "auc"),
            f"{interval_text(figures, 'sensitivity')} ({_percent(promised.get('sensitivity'))})",
            f"{interval_text(figures, 'specificity')} ({_percent(promised.get('specificity'))})",
            "guard off" if refused is None else _percent(refused),
            ", ".join(f"{other}: {interval_text(seen, 'auc')}" for other, seen
                      in figures.get("on_training_collections", {}).items()) or "n/a",
        ])  # fmt: skip
    return Section(
        "On a collection it never saw",
        paragraphs=[
            "For each training collection in turn, the same family was retrained on the "
            "others (same protocol and threshold rule) and scored on it. \"Promised\" is what "
            "that model's own out-of-fold evidence said at its threshold: the gap is how far "
            "the promise moves at a new site. Check a site with `pox validate` before use."
        ],
        table=rows,
    )


def threshold_sections(metadata: Mapping[str, Any], policy: DecisionPolicy) -> list[Section]:
    """The operating threshold and what it trades, and the other rules' operating points."""
    sections = [
        Section(
            "Operating threshold",
            paragraphs=[
                (
                    f"Threshold {_percent(policy.threshold)} on P({policy.positive_class}), rule "
                    f"{metadata.get('threshold_rule', 'n/a')}; probabilities calibrated "
                    f"({metadata.get('calibration', 'none')}, temperature "
                    f"{float(metadata.get('temperature', 1.0)):.3f})."
                ),
                policy.threshold_trade(),
                (
                    "A photo scoring above the threshold is flagged for a clinician even when its "
                    "probability is below 50%: the threshold is set low on purpose, to miss few "
                    "cases, and pays for it with false alarms."
                ),
            ],
        )
    ]
    if metadata.get("operating_points"):
        sections.append(
            Section(
                "Operating points",
                paragraphs=[
                    "Each rule's threshold, chosen on the selection evidence, with the rates it "
                    "promises there and the rates it gave on the test photos (never used to "
                    "choose). A site serves another with serve.threshold_override "
                    "(`pox validate` recommends one from its own labelled photos)."
                ],
                table=operating_point_rows(metadata["operating_points"]),
            )
        )
    return sections


def card_sections(name: str, metadata: Mapping[str, Any]) -> list[Section]:
    """The card's content; ``name`` is the registered model name."""
    policy = DecisionPolicy.from_metadata(name, "", metadata).with_threshold_override(
        metadata.get(SITE_OVERRIDE)
    )
    intended_use = [item.format(classes=" or ".join(policy.classes)) for item in INTENDED_USE]
    return [
        model_section(name, metadata, policy),
        Section("Intended use", bullets=intended_use),
        *data_sections(metadata),
        *([selection_section(metadata["selection"])] if metadata.get("selection") else []),
        *metric_sections(metadata),
        *threshold_sections(metadata, policy),
        *([backends_section(metadata)] if metadata.get("backends") else []),
        Section("Out-of-distribution rule", paragraphs=[ood_rule(metadata)]),
        Section("Monitoring", paragraphs=[monitor.card_text(metadata.get("monitoring"))]),
        Section("Known limits", bullets=KNOWN_LIMITS),
    ]


SPACE_NAMES = {
    "head": "the features the model's output layer reads",
    "image_statistics": "the photo's colour, texture and edge statistics",
}


def space_words(key: str) -> str:
    """A guard's space in words; an ensemble member's head guard names its member."""
    space = ood.space_of(key)
    words = SPACE_NAMES.get(space, space)
    return words if key == space else f"{words} (ensemble {key.split(ood.MEMBER_SEPARATOR)[1]})"


def ood_rule(metadata: Mapping[str, Any]) -> str:
    guard = metadata.get("ood")
    if not guard:
        return (
            "No guard was fitted for this model (publish.guard.fit was false at publish): "
            "every upload gets a label, whatever it shows."
        )
    spaces = [
        f"{space_words(key)} ({part['feature_dims']} numbers against "
        f"{part['reference_photos']} training photos; threshold {part['threshold']:.3f}, set "
        f"on {part['calibration_photos']} held-out photos "
        f"({part.get('calibration_source', ood.HELD_OUT_SOURCE)}) for a false-refusal rate of "
        f"at most {part['effective_alpha']:.2%})"
        for key, part in guard["spaces"].items()
    ]
    first = next(iter(guard["spaces"].values()))
    rate = float(guard["stated_false_refusal_rate"])
    return (
        f"Each upload is compared with the training photos in "
        f"{len(spaces)} way(s): " + "; ".join(spaces) + ". In each, features are standardised "
        f"and the mean distance to the {first['k']} nearest training photos is compared with "
        "the threshold. Above it in any, the answer says the photo does not look like a skin "
        "photo like those the model was trained on, and gives no label. "
        f"{stated_rate_in_words(rate)} Switch: serve.guard_enabled."
    )


def stated_rate_in_words(rate: float) -> str:
    """The guard's stated false-refusal rate as a person would say it."""
    return (
        f"About 1 in {max(1, round(1 / rate))} genuine skin photos like the training photos "
        f"may be refused ({rate:.1%} at most, a split-conformal bound on held-out photos)."
    )


# ---------------------------------------------------------------------------- rendering


def to_markdown(sections: Sequence[Section], title: str) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for paragraph in section.paragraphs:
            lines += [paragraph, ""]
        if section.bullets:
            lines += [f"- {item}" for item in section.bullets] + [""]
        if section.table:
            header, *rows = section.table
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            lines.append("")
        if section.preformatted:
            lines += ["```text", section.preformatted, "```", ""]
    return "\n".join(lines)


def to_html(sections: Sequence[Section], ui_path: str, title: str) -> str:
    esc = html.escape
    body = [
        f"<h1>{esc(title)}</h1>",
        f'<p><a href="{ui_path}/">Back to the photo check</a></p>',
    ]
    for section in sections:
        body.append(f"<section><h2>{esc(section.title)}</h2>")
        body += [f"<p>{esc(paragraph)}</p>" for paragraph in section.paragraphs]
        if section.bullets:
            body.append(
                "<ul>" + "".join(f"<li>{esc(item)}</li>" for item in section.bullets) + "</ul>"
            )
        if section.table:
            header, *rows = section.table
            body.append("<table><thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in header))
            body.append("</tr></thead><tbody>")
            body += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
            body.append("</tbody></table>")
        if section.preformatted:
            body.append(f"<pre>{esc(section.preformatted)}</pre>")
        body.append("</section>")
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title>"
        f'<link rel="stylesheet" href="{ui_path}/style.css"></head>'
        f'<body class="model-card"><main>{"".join(body)}</main></body></html>\n'
    )


def render(name: str, metadata: Mapping[str, Any], fmt: str = "md", ui_path: str = "/ui") -> str:
    """The card of a stored model as ``md`` or ``html`` (linking back to the page at
    ``ui_path``)."""
    sections = card_sections(name, metadata)
    title = (
        f"Model card: {metadata.get('registered_model_name', name)} "
        f"v{metadata.get('mlflow_model_version', '?')} ({metadata.get('model_name', '?')})"
    )
    return to_html(sections, ui_path, title) if fmt == "html" else to_markdown(sections, title)
