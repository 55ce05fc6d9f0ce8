"""The service's settings: the ``serve:`` section of the composed params, checked once.

Only what the service reads at start-up: what publishing reads (the backends to convert, the
guard's fitting, the monitoring basis) is ``publish:`` (:mod:`pox_pipeline.release.settings`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from PIL import Image

from pox_pipeline.common.deprecated import moved_keys
from pox_pipeline.common.params import load_params_file, params_file
from pox_pipeline.serving import monitor, tflite

BACKENDS = (tflite.KERAS, *tflite.BACKENDS)
# Renamed: the deprecated key -> its new key in serve (common/deprecated.py).
MOVED_TO_SERVE = {"serve.ood.enabled": "guard_enabled"}
# Deprecated keys the service never read (they moved to publish:, read at publish only).
PUBLISH_TIME_KEYS = ("publish_backends", "backend_check", "ood")


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class HeatmapConfig:
    alpha: float
    max_side: int
    grid: int


@dataclass(frozen=True)
class ExplainConfig:
    """``serve.explain``: /explain's own bound, so a burst of it cannot starve /predict."""

    max_concurrent: int  # Grad-CAM calls in flight per API worker
    max_waiting: int  # requests waiting for a turn; beyond that a 429 with Retry-After

    def __post_init__(self) -> None:
        if self.max_concurrent < 1 or self.max_waiting < 0:
            raise ValueError(
                f"serve.explain: max_concurrent={self.max_concurrent} must be >= 1 and "
                f"max_waiting={self.max_waiting} >= 0"
            )


@dataclass(frozen=True)
class ServeConfig:
    """The ``serve:`` section of the composed params (conf/serve/default.yaml says what each is)."""

    model_tag: str
    host: str
    port: int
    backend: str
    tflite_threads: int  # resolved from `auto` (tflite.thread_count)
    batch_sizes: tuple[int, ...]
    formats: tuple[str, ...]
    max_upload_bytes: int
    max_pixels: int
    max_decode_pixels: int
    max_concurrent_decodes: int
    max_images_per_request: int
    max_request_bytes: int
    request_body_timeout_s: float
    max_concurrency: int
    access_log: bool
    batching: bool
    max_batch_size: int
    max_latency_ms: int
    api_workers: int
    model_workers: int
    model_threads: int
    model_call_attempts: int
    model_call_timeout_s: float
    timeout_s: float
    ui_path: str
    heatmap: HeatmapConfig
    explain: ExplainConfig
    guard_enabled: bool  # check uploads against the guard stored with the model
    store_uploads: bool
    upload_dir: Path
    upload_retention_days: float
    monitoring: monitor.MonitoringSettings
    threshold_override: float | None = None  # a site's own threshold (pox validate)

    def __post_init__(self) -> None:
        # A call the batcher still holds must not be given up on (and it is never re-sent):
        # the per-call timeout outlasts the batcher's bound, and ends before the request's.
        if not self.max_latency_ms < 1000 * self.model_call_timeout_s < 1000 * self.timeout_s:
            raise ValueError(
                f"serve.model_call_timeout_s={self.model_call_timeout_s:g} must lie between "
                f"serve.max_latency_ms={self.max_latency_ms} ms (the batcher may hold a call "
                f"that long before running it) and serve.timeout_s={self.timeout_s:g} (so the "
                "503 reaches the client before its request times out)"
            )
        if not 0 < self.request_body_timeout_s < self.timeout_s:
            raise ValueError(
                f"serve.request_body_timeout_s={self.request_body_timeout_s:g} must be > 0 and "
                f"below serve.timeout_s={self.timeout_s:g} (a slow body gets its 408 first)"
            )
        # Starlette, which parses the forms, refuses more than 1000 files with a 500.
        if not 1 <= self.max_images_per_request <= 1000:
            raise ValueError(
                f"serve.max_images_per_request={self.max_images_per_request}: 1 to 1000"
            )
        if self.max_request_bytes < self.max_upload_bytes:
            raise ValueError(
                f"serve.max_request_bytes={self.max_request_bytes:,} is below "
                f"serve.max_upload_bytes={self.max_upload_bytes:,}: one photo could not be sent"
            )
        if min(self.max_concurrent_decodes, self.max_concurrency) < 1:
            raise ValueError(
                f"serve.max_concurrent_decodes={self.max_concurrent_decodes} and "
                f"serve.max_concurrency={self.max_concurrency} must be >= 1"
            )

    @classmethod
    def from_cfg(
        cls, serve_cfg: DictConfig | Mapping[str, Any], root: Path | None = None
    ) -> ServeConfig:
        """``root``: where relative folders start (default: the folder of :func:`params_file`,
        the project root). Deprecated keys still work for one release
        (:data:`MOVED_TO_SERVE`, with a FutureWarning; :data:`PUBLISH_TIME_KEYS` are ignored)."""
        values = (
            OmegaConf.to_container(serve_cfg, resolve=True)
            if isinstance(serve_cfg, DictConfig)
            else dict(serve_cfg)
        )
        values = moved_keys(values, "serve", MOVED_TO_SERVE, {"serve": values})
        for key in PUBLISH_TIME_KEYS:
            values.pop(key, None)
        if values["backend"] not in (tflite.AUTO, *BACKENDS):
            raise ValueError(
                f"serve.backend={values['backend']!r}; choose {tflite.AUTO} or one of {BACKENDS}"
            )
        values["model_workers"] = int(values["model_workers"])
        if values["model_workers"] < 1:
            raise ValueError(f"serve.model_workers={values['model_workers']}: at least 1")
        values["tflite_threads"] = tflite.thread_count(values["tflite_threads"],
                                                       values["model_workers"])  # fmt: skip
        values["batch_sizes"] = tuple(int(size) for size in values["batch_sizes"])
        if not values["batch_sizes"] or min(values["batch_sizes"]) < 1:
            raise ValueError(f"serve.batch_sizes={list(values['batch_sizes'])}: sizes >= 1")
        values["formats"] = tuple(name.upper() for name in values["formats"])
        Image.init()  # every plugin, so that OPEN lists each format Pillow can decode
        unknown = set(values["formats"]) - set(Image.OPEN)
        if unknown or not values["formats"]:
            raise ValueError(f"serve.formats={list(values['formats'])}: list formats Pillow reads, "
                             f"not {sorted(unknown)}")  # fmt: skip
        values["heatmap"] = HeatmapConfig(**values["heatmap"])
        values["explain"] = ExplainConfig(**values["explain"])
        root = params_file().resolve().parent if root is None else root
        values["monitoring"] = monitor.MonitoringSettings.from_cfg(values["monitoring"], root)
        values["upload_dir"] = (Path(root) / Path(values["upload_dir"]).expanduser()).resolve()
        if not values["upload_retention_days"] > 0:
            raise ValueError(
                f"serve.upload_retention_days={values['upload_retention_days']}: kept uploads "
                "are health data and must be deleted after a number of days > 0"
            )
        return cls(**values)

    def decode_limits(self) -> dict[str, Any]:
        """:func:`preprocess.decode_image`'s limits for an upload (also ``pox predict``'s)."""
        return {"max_bytes": self.max_upload_bytes, "max_pixels": self.max_pixels,
                "max_decode_pixels": self.max_decode_pixels, "formats": self.formats}  # fmt: skip

    @classmethod
    def load(cls, overrides: Sequence[str] = ()) -> ServeConfig:
        """Read ``$POX_PARAMS`` (default: the project's ``params.yaml``; in a built Bento the
        working directory's), its folder being the root of relative folders."""
        return cls.from_cfg(load_params_file(overrides).serve, params_file().resolve().parent)


