"""What publishing reads, checked once: the ``publish:`` section of the composed params
(conf/publish/default.yaml says what each is), and the few ``serve:`` keys a published model
is measured under, so that its backends are timed and its monitoring reference is scored as the
service will run them. The service never reads ``publish:``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pox_pipeline.common.deprecated import moved_keys
from pox_pipeline.guard import ood
from pox_pipeline.serving import tflite

# Renamed in issue 28: each deprecated serve.* key -> its key in publish (common/deprecated.py).
MOVED_TO_PUBLISH = {
    "serve.publish_backends": "backends",
    **{f"serve.backend_check.{key}": f"backend_check.{key}"
       for key in ("min_label_agreement", "max_probability_difference", "latency_repeats",
                   "batch_size")},
    "serve.backend_check.calibration_images": "backend_check.representative_photos",
    "serve.ood.enabled": "guard.fit",
    **{f"serve.ood.{key}": f"guard.{key}"
       for key in ("spaces", "statistics_size", "k", "alpha", "batch_size")},
    "serve.monitoring.components": "monitoring_components",
}  # fmt: skip


@dataclass(frozen=True)
class PublishConfig:
    """``publish:`` (``backends`` .. ``monitoring_components``), then how the service will run
    the model (``serve.backend``, ``serve.tflite_threads``, ``serve.batch_sizes``,
    ``serve.monitoring.enabled``)."""

    backends: tuple[str, ...]  # the TFLite conversions to try
    backend_check: tflite.BackendCheck
    fit_guard: bool  # publish.guard.fit
    guard: ood.OODSettings  # how the guard is fitted (its spaces also shape the conversions)
    monitoring_components: int
    served_backend: str  # serve.backend: what the monitoring reference is scored with
    tflite_threads: int  # resolved from `auto`, as the service resolves it
    batch_sizes: tuple[int, ...]
    monitored: bool  # serve.monitoring.enabled: the service records answers, so a reference ships

    @property
    def image_statistics(self) -> bool:
        """The converted pass computes the image statistics whenever the service will (for the
        guard, or for monitoring), and every backend is timed with them, as it serves."""
        return self.fit_guard or self.monitored

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> PublishConfig:
        """``cfg``: the whole composed config. The deprecated ``serve.*`` publish keys still
        work for one release (:data:`MOVED_TO_PUBLISH`, with a FutureWarning)."""
        publish = cfg.get("publish")  # None in a params file written before the rename
        values = moved_keys(
            OmegaConf.to_container(publish, resolve=True) if publish is not None else {},
            "publish", MOVED_TO_PUBLISH, OmegaConf.to_container(cfg, resolve=True),
        )  # fmt: skip
        backends = tuple(str(name) for name in values["backends"])
        unknown = set(backends) - set(tflite.BACKENDS)
        if unknown:
            raise ValueError(f"publish.backends: {sorted(unknown)} are no TFLite backends "
                             f"({', '.join(tflite.BACKENDS)})")  # fmt: skip
        fit_guard, guard = _guard(values["guard"])
        serve = cfg.serve
        return cls(
            backends=backends,
            backend_check=tflite.BackendCheck(**values["backend_check"]),
            fit_guard=fit_guard,
            guard=guard,
            monitoring_components=int(values["monitoring_components"]),
            served_backend=str(serve.backend),
            tflite_threads=tflite.thread_count(serve.tflite_threads),
            batch_sizes=tuple(int(size) for size in serve.batch_sizes),
            monitored=bool(serve.monitoring.enabled),
        )


def guard_config(cfg: DictConfig) -> tuple[bool, ood.OODSettings]:
    """``publish.guard`` alone: (whether publishing fits a guard, how), for code that fits one
    as publishing does. ``cfg``: the whole composed config (deprecated keys as in
    :meth:`PublishConfig.from_cfg`)."""
    moves = {old: new.removeprefix("guard.") for old, new in MOVED_TO_PUBLISH.items()
             if new.startswith("guard.")}  # fmt: skip
    guard = cfg.get("publish", {}).get("guard")  # None before the rename
    return _guard(moved_keys(
        OmegaConf.to_container(guard, resolve=True) if guard is not None else {},
        "publish.guard", moves, OmegaConf.to_container(cfg, resolve=True),
    ))  # fmt: skip


def _guard(values: dict[str, Any]) -> tuple[bool, ood.OODSettings]:
    """(``fit``, the rest as :class:`ood.OODSettings`) of a ``publish.guard`` section."""
    values = dict(values)
    fit = bool(values.pop("fit"))
    return fit, ood.OODSettings.from_cfg(values)
