"""Production monitoring: do this week's uploads still look like the photos the model was
validated on? Without keeping a photo.

Three parts, one home:

- **Records** (serving): for every answered image a few numbers go through BentoML's monitor
  (JSON lines, one file per API worker per day under ``<serve.monitoring.dir>/records``,
  deleted after ``retention_days``; the timestamp truncated to ``timestamp_resolution``, no
  request or trace id): the answer (label, positive probability, in_distribution, the
  guard's score per feature space), ten named image statistics (brightness, contrast, colour
  means, edges, texture: read off the guard's colour/texture features) and a few principal
  components of the model's head features. Never the photo, its file name or the embedding.
  Live counters and histograms of the same answers go to ``/metrics`` (prometheus_client).
- **Reference** (publishing): the same columns for the validation photos, computed through
  the serving path (backend, TTA), stored beside the model with the PCA basis, fitted on the
  training photos' head features.
- **Tests** (``pox monitor``): each model version's records against its reference, with
  scipy tests whose method is pinned (Fisher's exact test, exact two-sample KS, an exact
  binomial test), Holm's correction over all of them, PSI for the probability as a
  conventional reading. Writes drift.json and an HTML page (``<dir>/reports``, each through a
  temporary file and a rename); exit 1 on drift, 2 on an error.

Monitoring never stops the service: when its folder cannot be written, the service answers
without records, logs why once, and says so on ``/metrics`` (``pox_monitoring_enabled 0``).
"""

from __future__ import annotations

import functools
import json
import logging.handlers
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pox_pipeline.guard import ood
from pox_pipeline.models import forward

if TYPE_CHECKING:
    from collections import deque

    from bentoml.monitoring import DefaultMonitor

    from pox_pipeline.serving.policy import DecisionPolicy

logger = logging.getLogger(__name__)

MONITORING_DIR_ENV = "POX_MONITORING_DIR"  # overrides serve.monitoring.dir (the container's)
RECORDS_DIR = "records"  # inside the monitoring directory: bentoml's JSON lines
REPORTS_DIR = "reports"  # inside the monitoring directory: drift.json, drift.html
# The keys serve.monitoring.dir replaced, kept working for one release: old key -> its folder.
DEPRECATED_KEYS = {"log_path": RECORDS_DIR, "report_dir": REPORTS_DIR}
MONITOR_NAME = "pox_answers"  # one bentoml.monitor per process (its loggers are global)
BASIS_FILE = "monitoring_basis.npz"  # beside the model, like ood.npz
REFERENCE_FILE = "monitoring_reference.csv"
REPORT_JSON = "drift.json"
REPORT_HTML = "drift.html"
ROTATED_SUFFIX = "%Y-%m-%d"  # a day's file: data.<worker>.log.<date>

GUARD_COLUMNS = tuple(f"guard_{space}" for space in forward.FEATURE_SPACES)
# The ten named statistics, each read off ColourTextureFeatures (see :func:`statistic_indices`).
STATISTICS = (
    "brightness", "contrast", "saturation", "red_mean", "green_mean", "blue_mean",
    "chroma_blue", "chroma_red", "edge_energy", "texture_irregularity",
)  # fmt: skip
# ColourTextureFeatures' colour channels, in its order: RGB, HSV, YCbCr.
CHANNELS = ("red", "green", "blue", "hue", "saturation", "value", "luma", "cb", "cr")
ANSWER_COLUMNS = ("label", "positive_probability", "in_distribution", "ood_score")
CATEGORICAL = ("model_version", "label", "in_distribution")
# PSI: an empty bin counts as this share, so the logarithm stays finite.
PSI_FLOOR = 1e-4
# Conventional reading of PSI: below 0.1 stable, 0.1-0.25 moderate, above 0.25 major shift.
PSI_LEVELS = ((0.1, "stable"), (0.25, "moderate"), (math.inf, "major"))


def component_columns(count: int) -> tuple[str, ...]:
    return tuple(f"head_pc{i}" for i in range(1, count + 1))


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class MonitoringSettings:
    """``serve.monitoring`` (conf/serve/default.yaml says what each is). ``records_dir`` and
    ``reports_dir`` are absolute: ``records/`` and ``reports/`` of the monitoring directory."""

    enabled: bool
    records_dir: Path
    reports_dir: Path
    retention_days: int
    timestamp_resolution: timedelta
    since: str
    min_answers: int
    alpha: float
    psi_bins: int
    probability_buckets: tuple[float, ...]
    guard_score_buckets: tuple[float, ...]

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any], root: Path) -> MonitoringSettings:
        """``root``: the project root (the params file's folder), where a relative
        ``serve.monitoring.dir`` starts; ``$POX_MONITORING_DIR`` replaces the setting."""
        values = dict(cfg)
        # deprecated: publish.monitoring_components now (the basis is fitted at publish, and the
        # service reads its size from the stored basis)
        values.pop("components", None)
        old = {key: values.pop(key) for key in DEPRECATED_KEYS if key in values}
        folder = values.pop("dir", None)
        if folder is None and not old:
            raise ValueError("serve.monitoring.dir is missing: the monitoring directory")
        folder = _resolved(folder or "monitoring", root)
        values["records_dir"], values["reports_dir"] = folder / RECORDS_DIR, folder / REPORTS_DIR
        if os.environ.get(MONITORING_DIR_ENV):
            folder = _resolved(os.environ[MONITORING_DIR_ENV], root)
            values["records_dir"], values["reports_dir"] = (folder / RECORDS_DIR,
                                                            folder / REPORTS_DIR)  # fmt: skip
        elif old:
            for key, value in old.items():
                values[f"{DEPRECATED_KEYS[key]}_dir"] = _resolved(value, root)
        if old:
            warnings.warn(
                f"serve.monitoring.{' and serve.monitoring.'.join(old)}: deprecated, removed "
                "in the next release. Set serve.monitoring.dir to one folder (records/ and "
                "reports/ are made in it) "
                f"or ${MONITORING_DIR_ENV}. Using records {values['records_dir']} and reports "
                f"{values['reports_dir']}.",
                FutureWarning, stacklevel=2,
            )  # fmt: skip
        values["timestamp_resolution"] = parse_since(values["timestamp_resolution"])
        for key in ("probability_buckets", "guard_score_buckets"):
            values[key] = tuple(float(b) for b in values[key])
        settings = cls(**values)
        if settings.retention_days < 1:
            raise ValueError("serve.monitoring.retention_days must be at least 1")
        if not 0 < settings.alpha < 1:
            raise ValueError(f"serve.monitoring.alpha must be in (0, 1), got {settings.alpha}")
        resolution = settings.timestamp_resolution.total_seconds()
        if not (resolution >= 1 and resolution.is_integer() and 86400 % resolution == 0):
            raise ValueError(
                f"serve.monitoring.timestamp_resolution={cfg['timestamp_resolution']!r}: a "
                "whole number of seconds that divides a day (1s .. 1d, e.g. 15m, 1h, 6h)"
            )
        parse_since(settings.since)
        return settings

    def in_dir(self, folder: Path) -> MonitoringSettings:
        """The same settings on another monitoring directory (``pox monitor --dir``)."""
        folder = Path(folder).resolve()
        return replace(self, records_dir=folder / RECORDS_DIR, reports_dir=folder / REPORTS_DIR)


def _resolved(folder: str | Path, root: Path) -> Path:
    """An absolute folder: a relative one starts at ``root``, never the working directory."""
    return (Path(root) / Path(folder).expanduser()).resolve()


def parse_since(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m``, ``10s`` -> a timedelta."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([dhms])\s*", str(text))
    if not match:
        raise ValueError(f"{text!r}: write a number and d, h, m or s, e.g. 7d")
    unit = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}[match.group(2)]
    return timedelta(**{unit: float(match.group(1))})


def coarse_time(moment: datetime, resolution: timedelta) -> datetime:
    """``moment`` truncated to a multiple of ``resolution`` (one that divides a day): for 1h,
    the start of its hour. What a record keeps of when it was written."""
    return moment - (moment - datetime.min.replace(tzinfo=moment.tzinfo)) % resolution


def write_atomically(path: Path, text: str, mode: int = 0o644) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``: a
    reader (a ``/metrics`` scrape, another worker) sees the old file or the new one, never
    half of one. ``mode`` 0644: the service may run as another user than ``pox monitor``."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------- the columns


@functools.cache  # read on every served batch; building the layer costs more than the batch
def statistic_indices() -> dict[str, tuple[int, ...] | tuple[str, int, int]]:
    """Where each named statistic sits in ColourTextureFeatures' output (its default layout,
    the guard's): moments (mean, std per channel), quantiles, colour histograms, LBP
    histograms per radius, the gradient histogram. Edge energy needs the whole gradient
    histogram: ``("gradient", first, bins)``."""
    from pox_pipeline.models.colour_texture import COLOUR_CHANNELS, LBP_BINS, ColourTextureFeatures

    layer = ColourTextureFeatures()
    moments = 0
    lbp = moments + COLOUR_CHANNELS * (2 + len(layer.quantiles) + layer.histogram_bins)
    gradient = lbp + LBP_BINS * len(layer.lbp_radii)

    def mean(channel: str) -> tuple[int, ...]:
        return (moments + 2 * CHANNELS.index(channel),)

    return {
        "brightness": mean("luma"),
        "contrast": (moments + 2 * CHANNELS.index("luma") + 1,),
        "saturation": mean("saturation"),
        "red_mean": mean("red"),
        "green_mean": mean("green"),
        "blue_mean": mean("blue"),
        "chroma_blue": mean("cb"),
        "chroma_red": mean("cr"),
        "edge_energy": ("gradient", gradient, layer.gradient_bins),
        # the share of non-uniform LBP codes (the last bin) at the smallest radius
        "texture_irregularity": (lbp + LBP_BINS - 1,),
    }


def named_statistics(image_statistics: np.ndarray) -> np.ndarray:
    """(N, 213) colour/texture features -> (N, len(STATISTICS)) named statistics. Edge
    energy is the mean grey-level gradient magnitude read off its histogram (bin centres)."""
    values = np.asarray(image_statistics, np.float64)
    indices = statistic_indices()
    columns = []
    for name in STATISTICS:
        where = indices[name]
        if where[0] == "gradient":
            _, first, bins = where
            columns.append(values[:, first : first + bins] @ gradient_bin_centres(bins))
        else:
            columns.append(values[:, where[0]])
    return np.stack(columns, axis=1)


@functools.cache
def gradient_bin_centres(bins: int) -> np.ndarray:
    """The grey-level gradient magnitude at the centre of each of ColourTextureFeatures'
    gradient histogram bins."""
    from pox_pipeline.models.colour_texture import ColourTextureFeatures

    centres = (np.arange(bins) + 0.5) * (ColourTextureFeatures().gradient_range / bins)
    centres.flags.writeable = False  # cached: shared by every call
    return centres


@dataclass(frozen=True)
class Basis:
    """The head features' principal components, fitted on the training photos at publish."""

    mean: np.ndarray
    components: np.ndarray  # (count, head dims), rows orthonormal

    @classmethod
    def fit(cls, head: np.ndarray, count: int) -> Basis:
        values = np.asarray(head, np.float64)
        mean = values.mean(axis=0)
        _, _, rows = np.linalg.svd(values - mean, full_matrices=False)
        return cls(mean, rows[: min(count, len(rows))])

    def project(self, head: np.ndarray) -> np.ndarray:
        return (np.asarray(head, np.float64) - self.mean) @ self.components.T

    @property
    def columns(self) -> tuple[str, ...]:
        return (*GUARD_COLUMNS, *STATISTICS, *component_columns(len(self.components)))

    def save(self, path: Path) -> Path:
        np.savez(path, mean=self.mean, components=self.components)
        return path

    @classmethod
    def load(cls, path: Path) -> Basis:
        with np.load(path) as stored:
            return cls(stored["mean"], stored["components"])


def monitored_columns(
    guard_ratios: np.ndarray, features: Mapping[str, np.ndarray], basis: Basis
) -> np.ndarray:
    """The model process's share of a record, (N, len(basis.columns)): each guard space's
    distance / threshold (``guard_ratios``, :func:`guard_ratios`), the named statistics and
    the head components. ``features`` has both spaces (:data:`forward.FEATURE_SPACES`)."""
    return np.concatenate(
        [
            guard_ratios,
            named_statistics(features[forward.IMAGE_STATISTICS]),
            basis.project(features[forward.HEAD]),
        ],
        axis=1,
    )


def guard_ratios(features: Mapping[str, np.ndarray], guard: ood.GuardSet | None) -> np.ndarray:
    """(N, len(FEATURE_SPACES)): distance / threshold per space (nan for a space not guarded,
    or for every space without a guard); the OOD score is their largest."""
    if guard is None:
        return np.full((len(features[forward.HEAD]), len(forward.FEATURE_SPACES)), np.nan)
    return guard.space_ratios(features)


def records(
    answers: Sequence[Mapping[str, Any]], columns: np.ndarray, names: Sequence[str],
    positive_class: str,
) -> list[dict[str, Any]]:  # fmt: skip
    """One flat record per answer: what was answered, and the monitored numbers."""
    rows = []
    for answer, values in zip(answers, np.asarray(columns, np.float64), strict=True):
        score = answer.get("ood", {}).get("score")
        probabilities = answer.get("probabilities")  # null for a photo the guard refused
        row = {
            "model_version": answer["model"]["version"],
            "label": answer.get("label"),
            "positive_probability": (
                None if probabilities is None else float(probabilities[positive_class])
            ),
            "in_distribution": bool(answer["in_distribution"]),
            "ood_score": None if score is None else float(score),
        }
        pairs = zip(names, values, strict=True)
        row.update({name: None if np.isnan(v) else float(v) for name, v in pairs})
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- publishing


def split_columns(scored: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Predictor.outputs_with_monitoring -> (outputs with the OOD score, monitored columns)."""
    return scored[:, : scored.shape[1] - count], scored[:, scored.shape[1] - count :]


def card_text(monitoring: Mapping[str, Any] | None) -> str:
    if not monitoring:
        return "No monitoring reference was stored with this model: `pox monitor` cannot test it."
    return (
        "Each answer is logged as a few numbers, never the photo or its file name: the label, "
        "the positive-class probability, the out-of-distribution verdict and score per feature "
        f"space, {len(STATISTICS)} image statistics ({', '.join(STATISTICS)}) and "
        f"{monitoring['components']} principal components of the head features. `pox monitor` "
        f"compares them with the same numbers for the {monitoring['reference_photos']} "
        + (
            "photos the model was refitted on, stored with the model (its answers and guard "
            "scores there are out of fold: from the cross-validation model that did not train "
            "on the photo), and reports drift."
            if monitoring.get("reference_answers") == "out_of_fold"
            else "validation photos, stored with the model, and reports drift."
        )
    )


# ---------------------------------------------------------------------------- serving


LOG_CONFIG = """
version: 1
disable_existing_loggers: false
loggers:
  bentoml_monitor_data:
    level: INFO
    handlers: [bentoml_monitor_data]
    propagate: false
  bentoml_monitor_schema:
    level: INFO
    handlers: [bentoml_monitor_schema]
    propagate: false
handlers:
  bentoml_monitor_data:
    class: pox_pipeline.serving.monitor.RetainedDailyFileHandler
    level: INFO
    formatter: bentoml_json
    filename: '{data_filename}'
    retention_days: %(retention_days)d
  bentoml_monitor_schema:
    class: logging.FileHandler
    level: INFO
    formatter: bentoml_json
    filename: '{schema_filename}'
formatters:
  bentoml_json:
    class: pythonjsonlogger.jsonlogger.JsonFormatter
    format: "()"
    validate: false
"""


class RetainedDailyFileHandler(logging.handlers.TimedRotatingFileHandler):
    """BentoML's daily file (``data.<worker>.log``), rotated at midnight to
    ``data.<worker>.log.<date>``; rotated files older than ``retention_days`` are deleted at
    each rotation and at start. (BentoML's own handler keeps every day forever.)"""

    def __init__(self, filename: str, retention_days: int, **kwargs: Any) -> None:
        super().__init__(filename, when="midnight", backupCount=0, **kwargs)
        self.retention_days = retention_days
        self.delete_expired()

    def doRollover(self) -> None:  # noqa: N802 - logging's name
        super().doRollover()
        self.delete_expired()

    def delete_expired(self, today: datetime | None = None) -> list[Path]:
        """Delete the rotated files of days before ``today - retention_days``."""
        oldest = (today or datetime.now()).date() - timedelta(days=self.retention_days)
        current = Path(self.baseFilename)
        deleted = []
        for path in current.parent.glob(f"{current.name}.*"):
            try:
                day = datetime.strptime(path.name[len(current.name) + 1 :], ROTATED_SUFFIX)
            except ValueError:
                continue
            if day.date() < oldest:
                path.unlink(missing_ok=True)
                deleted.append(path)
        return deleted


@functools.cache  # bentoml is imported on first use: `pox` and the offline side need none of it
def record_monitor_class() -> type[DefaultMonitor]:
    """BentoML's default monitor (JSON lines through ``logging``), writing each record with a
    coarse timestamp and without the request and trace ids it adds: a record cannot be joined
    to an access log line, by id or by time."""
    from bentoml.monitoring import DefaultMonitor

    class CoarseMonitor(DefaultMonitor):
        PRESERVED_COLUMNS = ("timestamp",)

        def __init__(self, name: str, log_path: str, log_config_file: str,
                     resolution: timedelta) -> None:  # fmt: skip
            super().__init__(name, log_path, log_config_file)
            self.resolution = resolution

        def open(self) -> None:
            """Open the day file now (BentoML opens it at the first record), so that a folder
            the service cannot write is found at start, not as a 500 on an answer."""
            self._init_logger()

        def export_data(self, datas: dict[str, deque[Any]]) -> None:
            stamp = coarse_time(datetime.now(), self.resolution).isoformat(timespec="seconds")
            for values in zip(*datas.values(), strict=True):
                self.data_logger.info({**dict(zip(datas, values, strict=True)),
                                       "timestamp": stamp})  # fmt: skip

    return CoarseMonitor


class ServiceMonitor:
    """The API process's side: splits the monitored columns off the model service's array,
    writes one record per answer and keeps the live ``/metrics`` series. The columns are split
    off whenever the model service adds them (``serve.monitoring.enabled`` and a model
    published with a reference); records are written only where the records folder can be
    written. Otherwise the service answers as before, ``reason`` says why nothing is kept, and
    ``/metrics`` shows it."""

    def __init__(
        self,
        settings: MonitoringSettings,
        model_dir: Path | None,
        policy: DecisionPolicy | None,
        registry: Any = None,
    ) -> None:
        """``registry``: the live series' prometheus_client registry (default: the global one,
        which BentoML serves)."""
        basis_file = None if model_dir is None else Path(model_dir) / BASIS_FILE
        monitored = bool(settings.enabled and basis_file is not None and basis_file.is_file())
        self.settings = settings
        self.columns: tuple[str, ...] = Basis.load(basis_file).columns if monitored else ()
        self.policy = policy
        self.metrics = LiveMetrics(settings, registry) if monitored else None
        self.recorder: DefaultMonitor | None = None
        if not settings.enabled:
            self.reason = "serve.monitoring.enabled is false"
        elif not monitored:
            self.reason = "the model was published without a monitoring reference"
        else:
            try:
                self.recorder = self._open_recorder()
                self.reason = "on"
            except (OSError, ValueError) as error:  # logging wraps its OSError in a ValueError
                cause = error.__cause__ if isinstance(error.__cause__, OSError) else error
                self.reason = f"records folder {settings.records_dir} not writable: {cause}"
                logger.warning(
                    "monitoring is OFF: %s. The service answers, but keeps no records for "
                    "`pox monitor`: set serve.monitoring.dir or $%s to a writable folder (in a "
                    "container, a mounted volume).", self.reason, MONITORING_DIR_ENV,
                )  # fmt: skip

    @property
    def enabled(self) -> bool:
        """Whether answers are recorded."""
        return self.recorder is not None

    def _open_recorder(self) -> DefaultMonitor:
        folder = self.settings.records_dir
        folder.mkdir(parents=True, exist_ok=True)
        config = write_atomically(
            folder / f".{MONITOR_NAME}.logging.yaml",
            LOG_CONFIG % {"retention_days": self.settings.retention_days},
        )
        recorder = record_monitor_class()(MONITOR_NAME, str(folder), str(config),
                                          self.settings.timestamp_resolution)  # fmt: skip
        recorder.open()
        return recorder

    def split(self, scored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return split_columns(scored, len(self.columns))

    def record(
        self, endpoint: str, answers: Sequence[Mapping[str, Any]], columns: np.ndarray
    ) -> None:
        """One record per answer through the monitor (what ``bentoml.monitor`` does, on the
        monitor opened at start; columns of equal length: its own length check is a no-op),
        and the live series."""
        if self.metrics is None or not answers:
            return
        rows = records(answers, columns, self.columns, self.policy.positive_class)
        if self.recorder is not None:
            self.recorder.start_record()
            self.recorder.log_batch([endpoint] * len(rows), "endpoint", "feature", "categorical")
            for name in rows[0]:
                role = "prediction" if name in ANSWER_COLUMNS else "feature"
                kind = "categorical" if name in CATEGORICAL else "numerical"
                self.recorder.log_batch([row[name] for row in rows], name, role, kind)
            self.recorder.stop_record()
        self.metrics.observe(endpoint, rows)

    def rejected(self, status: int) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels(status=str(status)).inc()

    def metrics_text(self, exposition: str) -> str:
        """``/metrics`` plus whether answers are recorded (and why not), and the last
        ``pox monitor`` result as gauges."""
        text = exposition + status_gauges(self.enabled, self.reason)
        if self.settings.enabled:
            text += drift_gauges(self.settings.reports_dir / REPORT_JSON)
        return text


class LiveMetrics:
    """The answers as Prometheus series (BentoML collects them from every worker)."""

    def __init__(self, settings: MonitoringSettings, registry: Any = None) -> None:
        import prometheus_client as prom

        registry = prom.REGISTRY if registry is None else registry
        self.answers = prom.Counter(
            "pox_answers", "Answered images by label and in_distribution",
            ["endpoint", "label", "in_distribution"], registry=registry,
        )  # fmt: skip
        self.probability = prom.Histogram(
            "pox_positive_probability", "The positive-class probability of each answer",
            buckets=settings.probability_buckets, registry=registry,
        )  # fmt: skip
        self.guard_score = prom.Histogram(
            "pox_guard_score", "Out-of-distribution score of each checked answer (above 1: out)",
            buckets=settings.guard_score_buckets, registry=registry,
        )  # fmt: skip
        self.rejected = prom.Counter(
            "pox_rejected_uploads", "Uploads refused, by HTTP status", ["status"],
            registry=registry,
        )  # fmt: skip

    def observe(self, endpoint: str, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            label = "none" if row["label"] is None else str(row["label"])
            inside = str(row["in_distribution"]).lower()
            self.answers.labels(endpoint=endpoint, label=label, in_distribution=inside).inc()
            if row["positive_probability"] is not None:  # none for a refused photo
                self.probability.observe(row["positive_probability"])
            if row["ood_score"] is not None:
                self.guard_score.observe(row["ood_score"])


def label_value(text: str) -> str:
    """``text`` escaped as a Prometheus label value."""
    return str(text).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def status_gauges(enabled: bool, reason: str) -> str:
    """Whether answers are recorded, and why (text exposition)."""
    return "\n".join([
        "# HELP pox_monitoring_enabled 1 when answers are recorded for pox monitor",
        "# TYPE pox_monitoring_enabled gauge",
        f"pox_monitoring_enabled {int(enabled)}",
        "# HELP pox_monitoring_info Why answers are recorded or not (reason=on when they are)",
        "# TYPE pox_monitoring_info gauge",
        f'pox_monitoring_info{{reason="{label_value(reason)}"}} 1',
    ]) + "\n"  # fmt: skip


def drift_gauges(report_file: Path) -> str:
    """The last drift report as Prometheus gauges (text exposition); empty without one. A
    report that cannot be read or makes no sense (garbage, wrong keys, a file a writer left
    half done) gives ``pox_drift_report_readable 0`` and no other drift series: ``/metrics``
    never fails because of it."""
    try:
        text = report_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except (OSError, ValueError):  # unreadable, or not UTF-8
        text = None
    try:
        lines = [] if text is None else _report_lines(json.loads(text))
    except Exception:  # whatever the file holds, the scrape must succeed
        lines = []
    header = [
        "# HELP pox_drift_report_readable 0 when the drift report exists but cannot be read",
        "# TYPE pox_drift_report_readable gauge",
        f"pox_drift_report_readable {int(bool(lines))}",
    ]
    return "\n".join(header + lines) + "\n"


def _report_lines(report: Mapping[str, Any]) -> list[str]:
    """The drift gauges of a parsed report; raises on anything missing or of the wrong type."""
    lines = [
        "# HELP pox_drift_detected 1 when the last pox monitor run found drift",
        "# TYPE pox_drift_detected gauge",
        f"pox_drift_detected {int(bool(report['drift']))}",
        "# HELP pox_drift_answers Answers the last pox monitor run tested",
        "# TYPE pox_drift_answers gauge",
        f"pox_drift_answers {int(report['answers'])}",
        "# HELP pox_drift_report_timestamp_seconds When the last pox monitor run ended",
        "# TYPE pox_drift_report_timestamp_seconds gauge",
        f"pox_drift_report_timestamp_seconds {float(report['generated_at_unix'])!r}",
        "# HELP pox_drift_p_value Holm-adjusted p-value per model version and column",
        "# TYPE pox_drift_p_value gauge",
    ]
    for model in report["models"]:
        version = label_value(model["model_version"])
        for test in model.get("tests", []):
            lines.append(
                f'pox_drift_p_value{{model_version="{version}",'
                f'column="{label_value(test["column"])}"}} {float(test["p_adjusted"])!r}'
            )
    return lines
