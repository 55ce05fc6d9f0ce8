"""``pox monitor``'s side of monitoring: the records read back, the drift tests against each
version's reference (stored at publish by :mod:`pox_pipeline.release.reference`), the report
and its MLflow run. Kept out of :mod:`pox_pipeline.serving.monitor`, which the service imports,
so that serving needs neither pandas, scipy, matplotlib nor mlflow."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pox_pipeline.serving.monitor import (
    GUARD_COLUMNS,
    PSI_FLOOR,
    PSI_LEVELS,
    REFERENCE_FILE,
    REPORT_HTML,
    REPORT_JSON,
    STATISTICS,
    MonitoringSettings,
    coarse_time,
    write_atomically,
)

if TYPE_CHECKING:
    import pandas as pd


# ---------------------------------------------------------------------------- reading the logs


def read_records(
    records_dir: Path, start: datetime, end: datetime | None = None
) -> tuple[pd.DataFrame, int]:
    """Every record under ``records_dir`` (any depth: each monitor and worker, current and
    rotated files) with ``start <= timestamp <= end``, and how many lines were skipped: a
    line that is no record (the last one while a worker writes it, or a damaged file's) is
    counted, never fatal."""
    rows, skipped = [], 0
    for path in sorted(Path(records_dir).rglob("data.*.log*")):
        try:
            text = path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:  # renamed by the midnight rotation since the listing
            continue
        for line in text.split("\n"):
            if not line.strip():
                continue
            row, stamp = _record_of(line)
            if row is None:
                skipped += 1
            elif stamp >= start and (end is None or stamp <= end):
                rows.append(row)
    return _frame(rows), skipped


def _record_of(line: str) -> tuple[dict[str, Any] | None, datetime | None]:
    """A JSON-lines record and its time (local, naive, as written), or (None, None)."""
    try:
        row = json.loads(line)
        stamp = datetime.fromisoformat(row["timestamp"])
    except (ValueError, TypeError, KeyError):  # not JSON, or not an object with a time
        return None, None
    return row, stamp.astimezone().replace(tzinfo=None) if stamp.tzinfo else stamp


def _frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(list(rows))


def load_reference(model_name: str, version: str) -> tuple[pd.DataFrame, str] | None:
    """A model version's reference table and positive class, from the BentoML store; None when
    the version is gone or was published without one."""
    import bentoml
    import pandas as pd
    from bentoml.exceptions import NotFound

    try:
        stored = bentoml.models.get(f"{model_name}:{version}")
    except NotFound:
        return None
    table = Path(stored.path) / REFERENCE_FILE
    if not table.is_file():
        return None
    return pd.read_csv(table), str(stored.info.metadata["positive_class"])


# ---------------------------------------------------------------------------- the tests


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment (family-wise error), in the input order."""
    p = np.asarray(p_values, np.float64)
    order = np.argsort(p)
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (len(p) - np.arange(len(p)))))
    out = np.empty_like(adjusted)
    out[order] = adjusted
    return out


def psi(reference: np.ndarray, current: np.ndarray, bins: int) -> float:
    """Population stability index on the reference's quantile bins."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    ref = np.bincount(np.searchsorted(edges, reference, "right"), minlength=len(edges) + 1)
    cur = np.bincount(np.searchsorted(edges, current, "right"), minlength=len(edges) + 1)
    ref_share = np.maximum(ref / ref.sum(), PSI_FLOOR)
    cur_share = np.maximum(cur / cur.sum(), PSI_FLOOR)
    return float(np.sum((cur_share - ref_share) * np.log(cur_share / ref_share)))


def psi_level(value: float) -> str:
    return next(name for limit, name in PSI_LEVELS if value < limit)


def stated_flag_rate(reference: pd.DataFrame) -> float:
    """The share of in-distribution photos the guard's thresholds say it flags: in each space
    the threshold is an order statistic of the validation photos' distances, so a new photo
    like them exceeds it with probability (validation photos above it + 1) / (n + 1)
    (split-conformal); over the spaces at most the sum."""
    rate = 0.0
    for column in GUARD_COLUMNS:
        ratios = reference[column].dropna().to_numpy(np.float64)
        if len(ratios):
            rate += (int((ratios > 1.0).sum()) + 1) / (len(ratios) + 1)
    return min(rate, 1.0)


def _numbers(frame: pd.DataFrame, column: str) -> np.ndarray:
    return frame[column].dropna().to_numpy(np.float64) if column in frame else np.array([])


def column_tests(
    current: pd.DataFrame, reference: pd.DataFrame, positive_class: str, psi_bins: int
) -> list[dict[str, Any]]:
    """Each column's test, unadjusted: label share (Fisher's exact), probability (exact KS,
    with PSI), guard flag rate (exact one-sided binomial against the stated rate), each
    statistic and component (exact KS). Columns without numbers on either side are skipped."""
    from scipy import stats

    tests = []
    labelled = current["label"].dropna()
    ref_labelled = reference["label"].dropna()
    if len(labelled) and len(ref_labelled):
        table = [
            [int((labelled == positive_class).sum()), int((labelled != positive_class).sum())],
            [int((ref_labelled == positive_class).sum()),
             int((ref_labelled != positive_class).sum())],
        ]
        result = stats.fisher_exact(table, alternative="two-sided")
        tests.append({
            "column": "label", "test": "fisher_exact", "statistic": float(result.statistic),
            "p_value": float(result.pvalue),
            "current": table[0][0] / len(labelled), "reference": table[1][0] / len(ref_labelled),
        })  # fmt: skip
    checked = current["ood_score"].notna() if "ood_score" in current else []
    if len(checked) and checked.any():
        flagged = int((~current.loc[checked, "in_distribution"].astype(bool)).sum())
        rate = stated_flag_rate(reference)
        result = stats.binomtest(flagged, int(checked.sum()), rate, alternative="greater")
        tests.append({
            "column": "in_distribution", "test": "binomial_greater",
            "statistic": flagged / int(checked.sum()), "p_value": float(result.pvalue),
            "current": flagged / int(checked.sum()), "reference": rate,
        })  # fmt: skip
    numeric = ["positive_probability", *GUARD_COLUMNS, *STATISTICS]
    numeric += [c for c in reference.columns if c.startswith("head_pc")]
    for column in numeric:
        now, ref = _numbers(current, column), _numbers(reference, column)
        if not len(now) or not len(ref):
            continue
        result = stats.ks_2samp(now, ref, alternative="two-sided", method="exact")
        entry = {
            "column": column, "test": "ks_exact", "statistic": float(result.statistic),
            "p_value": float(result.pvalue),
            "current": float(np.median(now)), "reference": float(np.median(ref)),
        }  # fmt: skip
        if column == "positive_probability":
            entry["psi"] = psi(ref, now, psi_bins)
            entry["psi_level"] = psi_level(entry["psi"])
        tests.append(entry)
    return tests


def check_version(
    current: pd.DataFrame, reference: pd.DataFrame, positive_class: str,
    settings: MonitoringSettings, min_answers: int,
) -> dict[str, Any]:  # fmt: skip
    """One model version's verdict: drift when any Holm-adjusted p-value is below alpha."""
    result: dict[str, Any] = {"answers": len(current), "reference_photos": len(reference)}
    if len(current) < min_answers:
        return {**result, "status": "not enough answers", "drift": False, "tests": []}
    tests = column_tests(current, reference, positive_class, settings.psi_bins)
    for test, adjusted in zip(tests, holm([t["p_value"] for t in tests]), strict=True):
        test["p_adjusted"] = float(adjusted)
        test["drift"] = bool(adjusted < settings.alpha)
    drift = any(t["drift"] for t in tests)
    return {**result, "status": "drift" if drift else "no drift", "drift": drift, "tests": tests}


def check(
    settings: MonitoringSettings,
    model_name: str,
    start: datetime,
    end: datetime | None = None,
    min_answers: int | None = None,
) -> dict[str, Any]:
    """Read the records of [start, end] and test each model version against its reference.
    ``start`` is truncated to ``serve.monitoring.timestamp_resolution``, as the records' times
    are: ``--since 30m`` at 10:20 tests the records stamped 09:00 and 10:00 (with 1h)."""
    start = coarse_time(start, settings.timestamp_resolution)
    frame, skipped = read_records(settings.records_dir, start, end)
    floor = settings.min_answers if min_answers is None else min_answers
    models = []
    for version, current in (frame.groupby("model_version") if not frame.empty else []):
        entry: dict[str, Any] = {"model_version": str(version), "model": model_name}
        found = load_reference(model_name, str(version))
        if found is None:
            entry.update(answers=len(current), status="no reference", drift=False, tests=[])
        else:
            entry.update(check_version(current, found[0], found[1], settings, floor))
            entry["_current"], entry["_reference"] = current, found[0]
        models.append(entry)
    drift = any(m["drift"] for m in models)
    enough = any(m["status"] in ("drift", "no drift") for m in models)
    return {
        "generated_at": datetime.now().isoformat(timespec="seconds"),
        "generated_at_unix": time.time(),
        "window": {"start": start.isoformat(timespec="seconds"),
                   "end": (end or datetime.now()).isoformat(timespec="seconds")},  # fmt: skip
        "records_dir": str(settings.records_dir),
        "timestamp_resolution_s": settings.timestamp_resolution.total_seconds(),
        "answers": len(frame),
        "skipped_lines": skipped,
        "min_answers": floor,
        "alpha": settings.alpha,
        "correction": "holm",
        "status": "drift" if drift else ("no drift" if enough else "not enough answers"),
        "drift": drift,
        "models": models,
    }


# ---------------------------------------------------------------------------- the report


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """drift.json (the tables, without the records) and drift.html (a plot per column), each
    through a temporary file and a rename: a ``/metrics`` scrape reading drift.json meanwhile
    sees the last report or this one, and a failure leaves the last one whole."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    public = {**report, "models": [{k: v for k, v in m.items() if not k.startswith("_")}
                                   for m in report["models"]]}  # fmt: skip
    text, page = json.dumps(public, indent=2) + "\n", render_html(report)
    return (write_atomically(out_dir / REPORT_JSON, text),
            write_atomically(out_dir / REPORT_HTML, page))  # fmt: skip


def _plot(current: np.ndarray, reference: np.ndarray, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4, 2.6))
    both = np.concatenate([current, reference])
    bins = np.histogram_bin_edges(both, bins="auto") if np.ptp(both) > 0 else 10
    axis.hist(reference, bins=bins, density=True, alpha=0.5, label="reference (validation)")
    axis.hist(current, bins=bins, density=True, alpha=0.5, label="current (served)")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def render_html(report: Mapping[str, Any]) -> str:
    import html

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>pox monitor</title></head><body>",
        f"<h1>Drift report: {html.escape(report['status'])}</h1>",
        f"<p>{report['answers']} answers from {html.escape(report['window']['start'])} to "
        f"{html.escape(report['window']['end'])}; family-wise alpha {report['alpha']} (Holm); "
        f"{report['skipped_lines']} record lines skipped (no record).</p>",
    ]
    for model in report["models"]:
        name = html.escape(f"{model['model']}:{model['model_version']}")
        parts.append(f"<h2>{name}: {html.escape(model['status'])} "
                     f"({model['answers']} answers)</h2>")  # fmt: skip
        current, reference = model.get("_current"), model.get("_reference")
        for test in model["tests"]:
            column = test["column"]
            line = (f"{column}: {test['test']}, p = {test['p_value']:.3g}, adjusted "
                    f"{test['p_adjusted']:.3g}{' DRIFT' if test['drift'] else ''}")  # fmt: skip
            if column == "label" or column == "in_distribution":
                parts.append(f"<p>{html.escape(line)}: current {test['current']:.3f}, "
                             f"reference {test['reference']:.3f}</p>")  # fmt: skip
            elif current is not None and reference is not None:
                image = _plot(_numbers(current, column), _numbers(reference, column), line)
                parts.append(f"<img alt='{column}' src='data:image/png;base64,{image}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def table(report: Mapping[str, Any]) -> str:
    """The printed summary: one line per test."""
    lines = [f"{report['status']}: {report['answers']} answers, {report['window']['start']} .. "
             f"{report['window']['end']}"]  # fmt: skip
    if report["skipped_lines"]:
        lines.append(f"skipped {report['skipped_lines']} record lines that are no record (one "
                     "being written, or a damaged file)")  # fmt: skip
    for model in report["models"]:
        lines.append(f"{model['model']}:{model['model_version']}  {model['status']}  "
                     f"({model['answers']} answers)")  # fmt: skip
        if model["tests"]:
            lines.append(f"  {'column':<24} {'test':<18} {'current':>9} {'reference':>9} "
                         f"{'p':>9} {'p (Holm)':>9}")  # fmt: skip
        for t in model["tests"]:
            lines.append(
                f"  {t['column']:<24} {t['test']:<18} {t['current']:>9.3f} {t['reference']:>9.3f} "
                f"{t['p_value']:>9.2g} {t['p_adjusted']:>9.2g}{'  DRIFT' if t['drift'] else ''}"
            )
    return "\n".join(lines)


def log_to_mlflow(report: Mapping[str, Any], files: Sequence[Path], cfg: Any) -> str:
    """One MLflow run per check, in the project's experiment: the verdict, each adjusted
    p-value, the report files."""
    import mlflow

    from pox_pipeline.training.tracking import setup_mlflow

    setup_mlflow(cfg)
    with mlflow.start_run(run_name="pox-monitor", tags={"stage": "monitor"}) as run:
        mlflow.log_metric("drift", int(report["drift"]))
        mlflow.log_metric("answers", report["answers"])
        for model in report["models"]:
            for t in model["tests"]:
                key = f"p_adjusted.{model['model_version']}.{t['column']}"
                mlflow.log_metric(key, t["p_adjusted"])
        for path in files:
            mlflow.log_artifact(str(path))
    return run.info.run_id
