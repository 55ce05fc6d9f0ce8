"""Serving core, free of HTTP: settings, predictor, Grad-CAM and upload handling.

``service.py`` wraps these in BentoML; tests and scripts call them directly. TensorFlow is
imported inside the functions that run the model, so the API process (which only decodes
uploads and formats JSON) starts without it.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from pox_pipeline import monitor, ood, preprocess, tflite
from pox_pipeline.inference import (
    load_stored_model,
    mean_over_views,
    recorded_calls,
    run_traced,
    traced,
    tta_views,
)
from pox_pipeline.policy import DecisionPolicy
from pox_pipeline.preprocess import ImageError, ImageTooLarge, UnsupportedFormat

if TYPE_CHECKING:
    import keras
    from bentoml import Model as StoredModel

PARAMS_ENV = "POX_PARAMS"
BACKENDS = (tflite.KERAS, *tflite.BACKENDS)
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Grad-CAM colours: a perceptually ordered dark-blue -> cyan -> yellow -> red ramp ("jet"-like),
# interpolated linearly between these stops so serving needs no matplotlib.
COLORMAP_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
COLORMAP_RGB = np.array(
    [[48, 18, 140], [30, 130, 240], [60, 220, 150], [250, 210, 40], [220, 30, 20]],
    dtype=np.float64,
)


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
    publish_backends: tuple[str, ...]
    backend_check: tflite.BackendCheck
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
    ood: ood.OODSettings
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
        the project root)."""
        values = (
            OmegaConf.to_container(serve_cfg, resolve=True)
            if isinstance(serve_cfg, DictConfig)
            else dict(serve_cfg)
        )
        if values["backend"] not in (tflite.AUTO, *BACKENDS):
            raise ValueError(
                f"serve.backend={values['backend']!r}; choose {tflite.AUTO} or one of {BACKENDS}"
            )
        unknown = set(values["publish_backends"]) - set(tflite.BACKENDS)
        if unknown:
            raise ValueError(f"serve.publish_backends: {sorted(unknown)} are no TFLite backends")
        values["publish_backends"] = tuple(values["publish_backends"])
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
        values["backend_check"] = tflite.BackendCheck(**values["backend_check"])
        values["heatmap"] = HeatmapConfig(**values["heatmap"])
        values["explain"] = ExplainConfig(**values["explain"])
        values["ood"] = ood.OODSettings.from_cfg(values["ood"])
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
        """Read ``$POX_PARAMS`` (default: the project's ``params.yaml``)."""
        from pox_pipeline.config import load_params

        path = params_file()
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"{path} not found (from {Path.cwd()}): run `python -m pox_pipeline.config` "
                f"in the project root, or set {PARAMS_ENV} to a composed params file"
            )
        return cls.from_cfg(load_params(path, overrides).serve, Path(path).resolve().parent)


def params_file() -> Path:
    """``$POX_PARAMS``, else the project's params.yaml (in a built Bento: the working
    directory's, its src/): the settings in use, and the project root as their folder."""
    from pox_pipeline.config import params_path

    return Path(os.environ.get(PARAMS_ENV) or params_path())


# ---------------------------------------------------------------------------- predictor


class Predictor:
    """Loads one model once and answers batches through a compiled call (never model.predict)."""

    def __init__(
        self,
        model_dir: Path,
        policy: DecisionPolicy,
        backend: str = tflite.KERAS,
        tflite_threads: int | None = None,
        ood_enabled: bool = True,
        monitoring: bool = False,
        batch_sizes: Sequence[int] | None = None,
    ) -> None:
        backend = policy.fastest_backend if backend == tflite.AUTO else backend
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; choose {tflite.AUTO} or one of {BACKENDS}")
        if backend != tflite.KERAS and backend not in policy.backend_files:
            raise ValueError(
                f"backend {backend!r} was not published with model {policy.name}:{policy.version} "
                f"(published: {', '.join([tflite.KERAS, *policy.backend_files])}; its model card "
                "says why): choose one of those, or list it in serve.publish_backends and publish"
            )
        self.policy = policy
        self.backend = backend
        self.model = load_stored_model(Path(model_dir))
        # The converted model, on TFLite backends: the bytes stored at publish, never converted.
        self.runner = (
            tflite.Runner((Path(model_dir) / policy.backend_files[backend]).read_bytes(),
                          tflite_threads, batch_sizes)
            if backend != tflite.KERAS else None
        )  # fmt: skip

        guard_file = Path(model_dir) / ood.OOD_FILE
        self.guard = ood.GuardSet.load(guard_file) if ood_enabled and guard_file.is_file() else None
        # Monitoring (monitor.py): both feature spaces, projected on the basis stored at publish.
        basis_file = Path(model_dir) / monitor.BASIS_FILE
        self.basis = monitor.Basis.load(basis_file) if monitoring and basis_file.is_file() else None
        spaces = list(ood.FEATURE_SPACES if self.basis else self.guard.guards if self.guard else [])
        if not spaces and self.runner is None:
            self._features = None
            self._run = run_traced(
                traced(lambda batch: self.model(batch, training=False), policy.image_size)
            )
        else:  # one pass gives the answer and the guard's head features
            self._features = ood.feature_extractor(
                self.model, policy.image_size, spaces,
                self.guard.statistics_size if self.guard else policy.image_size, self.runner,
            )  # fmt: skip
            self._run = self._features.outputs
        self._gradcam_layer = last_conv2d(self.model)
        self._gradcam_lock = threading.Lock()
        # Trace / allocate now so that the first request is not the slow one.
        self.outputs(np.zeros((1, policy.image_size, policy.image_size, 3), np.float32))

    @classmethod
    def from_stored(
        cls,
        stored: StoredModel,
        backend: str = tflite.KERAS,
        tflite_threads: int | None = None,
        ood_enabled: bool = True,
        monitoring: bool = False,
        batch_sizes: Sequence[int] | None = None,
    ) -> Predictor:
        return cls(Path(stored.path), DecisionPolicy.from_stored(stored), backend, tflite_threads,
                   ood_enabled, monitoring, batch_sizes)  # fmt: skip

    def _view_batch(self, batch: np.ndarray) -> tuple[np.ndarray, int]:
        """All the policy's TTA views of all images as one contiguous batch, and the view count."""
        views = tta_views(np.asarray(batch, dtype=np.float32), self.policy.tta)
        inputs = views[0] if len(views) == 1 else np.concatenate(views)  # no copy without TTA
        return np.ascontiguousarray(inputs), len(views)

    def outputs(self, batch: np.ndarray) -> np.ndarray:
        """Model outputs for a float32 (N, S, S, 3) batch in [0, 255], averaged over the
        policy's TTA views: all views of all images go through the model as one batch."""
        inputs, n_views = self._view_batch(batch)
        return mean_over_views(self._run(inputs), n_views)

    def outputs_with_ood_score(self, batch: np.ndarray) -> np.ndarray:
        """:meth:`outputs` with one more column: each image's OOD score (above 1: out of
        distribution; nan when the guard is off or absent). One array, so BentoML's adaptive
        batching can carry it."""
        if self.guard is None:
            outputs = self.outputs(batch)
            return np.concatenate([outputs, np.full((len(outputs), 1), np.nan)], axis=1)
        model_outputs, features = self._features(*self._view_batch(batch))
        return np.concatenate([model_outputs, self.guard.scores(features)[:, None]], axis=1)

    def outputs_with_monitoring(self, batch: np.ndarray) -> np.ndarray:
        """:meth:`outputs_with_ood_score` with the monitored columns appended
        (:func:`monitor.monitored_columns`, ``self.basis.columns``), from the same pass; as
        :meth:`outputs_with_ood_score` when no monitoring basis is loaded."""
        if self.basis is None:
            return self.outputs_with_ood_score(batch)
        model_outputs, features = self._features(*self._view_batch(batch))
        ratios = monitor.guard_ratios(features, self.guard)  # each neighbour search runs once
        scores = ood.score_of(ratios)
        columns = monitor.monitored_columns(ratios, features, self.basis)
        return np.concatenate([model_outputs, scores[:, None], columns], axis=1)

    def predict(self, images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        """Model inputs (``preprocess.to_model_input``) -> one result dict per image, in order."""
        if not images:
            return []
        return self.policy.results(*split_ood_score(self.outputs_with_ood_score(np.stack(images))))

    def gradcam(self, image: np.ndarray) -> np.ndarray:
        """Grad-CAM of the positive-class score at the last Conv2D, in [0, 1] (conv resolution);
        for a model without one (``colour_texture``), the input-gradient saliency instead."""
        image = np.asarray(image, np.float32)  # the API process sends uint8
        if self._gradcam_layer is None:
            return input_saliency(self.model, image, self.policy.positive_index)
        with self._gradcam_lock:  # the layer hook is process-wide state
            return gradcam(self.model, self._gradcam_layer, image, self.policy.positive_index)

    def explain(self, photo: Image.Image, heatmap: HeatmapConfig) -> tuple[dict[str, Any], bytes]:
        """Prediction for a decoded photo and its Grad-CAM overlay as PNG bytes."""
        image = preprocess.to_model_input(photo, self.policy.image_size, self.policy.resample)
        result = self.predict([image])[0]
        return result, render_heatmap(photo, self.gradcam(image), heatmap)


def split_ood_score(scored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`Predictor.outputs_with_ood_score` -> (model outputs, OOD scores)."""
    return scored[:, :-1], scored[:, -1]


# ---------------------------------------------------------------------------- Grad-CAM


def last_conv2d(model: keras.Layer) -> keras.layers.Conv2D | None:
    """The last Conv2D in layer order, searching nested sub-models (a VGG16 base, a chain);
    None for a model without one."""
    import keras

    from pox_pipeline.inference import walk_layers

    convs = [layer for layer in walk_layers(model) if isinstance(layer, keras.layers.Conv2D)]
    return convs[-1] if convs else None


def gradcam(
    model: keras.Model, layer: keras.Layer, image: np.ndarray, output_index: int
) -> np.ndarray:
    """Grad-CAM (Selvaraju et al.): ReLU of the feature maps weighted by mean gradients."""
    import tensorflow as tf

    batch = tf.constant(image[None], dtype=tf.float32)
    with recorded_calls([layer], "output") as recorded, tf.GradientTape() as tape:
        score = model(batch, training=False)[:, output_index]
        features = recorded[-1]
    gradients = tape.gradient(score, features)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    return to_unit_peak(tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))[0].numpy())


def input_saliency(model: keras.Model, image: np.ndarray, output_index: int) -> np.ndarray:
    """|d score / d pixel| (largest over RGB) in [0, 1] at the image's resolution (Simonyan
    et al. 2014): the explanation of a model that has no convolutional feature maps."""
    import tensorflow as tf

    batch = tf.constant(image[None], dtype=tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(batch)
        score = model(batch, training=False)[:, output_index]
    return to_unit_peak(tf.reduce_max(tf.abs(tape.gradient(score, batch)), axis=-1)[0].numpy())


def to_unit_peak(values: np.ndarray) -> np.ndarray:
    """A non-negative map scaled so its peak is 1 (all zeros stays zeros)."""
    peak = float(values.max())
    return values / peak if peak > 0 else np.zeros_like(values)


def colorize(values: np.ndarray) -> np.ndarray:
    """[0, 1] array (H, W) -> uint8 RGB (H, W, 3) through :data:`COLORMAP_RGB`."""
    clipped = np.clip(values, 0.0, 1.0)
    channels = [np.interp(clipped, COLORMAP_STOPS, COLORMAP_RGB[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def render_heatmap(photo: Image.Image, cam: np.ndarray, heatmap: HeatmapConfig) -> bytes:
    """The Grad-CAM map stretched over the whole photo (as the model saw it), as PNG bytes.

    Colours are blended in proportion to the map, up to ``alpha`` at its peak, so regions
    without influence keep the photo's own colours. A map finer than ``grid`` cells a side
    (a per-pixel saliency) is first averaged into that grid: single pixels would not show.
    """
    shown = photo.convert("RGB")
    shown.thumbnail((heatmap.max_side, heatmap.max_side), Image.Resampling.BILINEAR)
    cam_image = Image.fromarray(np.asarray(cam, dtype=np.float32), mode="F")
    if max(cam_image.size) > heatmap.grid:
        cells = cam_image.resize((heatmap.grid, heatmap.grid), Image.Resampling.BOX)
        cam_image = Image.fromarray(to_unit_peak(np.asarray(cells)))
    stretched = np.clip(np.asarray(cam_image.resize(shown.size, Image.Resampling.BILINEAR)), 0, 1)
    colours = colorize(stretched).astype(np.float32)
    weight = heatmap.alpha * stretched[..., None]
    blended = (1 - weight) * np.asarray(shown, np.float32) + weight * colours
    buffer = io.BytesIO()
    Image.fromarray(blended.round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------- uploads


def read_upload(path: Path, max_bytes: int) -> bytes:
    """An uploaded file's bytes, its temporary file deleted at once.

    BentoML hands a file parameter over as a temporary file that it deletes only after the
    response has gone out; deleting it here keeps a photo on disk for milliseconds. Too large
    is refused from the size, before reading.
    """
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageTooLarge(f"the file is {size:,} bytes; the limit is {max_bytes:,} bytes")
        return path.read_bytes()
    finally:
        path.unlink(missing_ok=True)


def decode_upload(data: bytes, settings: ServeConfig, image_size: int) -> Image.Image:
    """Upload bytes -> upright RGB photo within the limits, a JPEG shrunk as it is decoded to
    the smallest size that covers ``image_size`` (as prepare decodes training photos), or
    :class:`ImageError`."""
    photo = preprocess.decode_image(data, draft=image_size, **settings.decode_limits())
    if settings.store_uploads:
        store_upload(photo, settings.upload_dir, settings.upload_retention_days)
    return photo


# The names store_upload gives (the purge deletes nothing else, wherever upload_dir points).
STORED_UPLOAD_NAME = re.compile(r"\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{8}\.[a-z0-9]+")
# After the purge at service start, kept uploads past their retention are deleted at most this
# often, as photos are stored: a scan at every upload would grow with the folder.
UPLOAD_PURGE_EVERY_S = 3600.0
_last_upload_purge: dict[Path, float] = {}  # folder -> time.monotonic() of its last purge


def open_upload_dir(upload_dir: Path, retention_days: float) -> int:
    """At service start (``serve.store_uploads``): the folder, owner-only (0700, also one made
    before with a wider mode), its uploads past ``retention_days`` deleted; returns how many."""
    upload_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    upload_dir.chmod(0o700)
    return purge_uploads(upload_dir, retention_days)


def store_upload(
    photo: Image.Image, upload_dir: Path, retention_days: float, now: datetime | None = None
) -> Path:
    """Keep an accepted photo (only when ``serve.store_uploads``) as PNG, owner-only (0600).

    The photo as decoded (upright RGB, shrunk as served) is re-encoded from its pixels alone:
    nothing of the upload's metadata (EXIF with GPS and the camera, ICC profile, text chunks)
    is kept. The client's filename is never used (it may itself identify the patient): the
    name is a UTC timestamp and a random suffix. Uploads past ``retention_days`` are deleted
    when the last purge is older than :data:`UPLOAD_PURGE_EVERY_S`.
    """
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S.%fZ")
    upload_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = upload_dir / f"{stamp}-{secrets.token_hex(4)}.png"
    # O_EXCL: never through a link or over a file someone placed there; 0600 whatever the umask
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
        Image.fromarray(np.asarray(photo)).save(handle, format="PNG")
    last = _last_upload_purge.get(upload_dir)
    if last is None or time.monotonic() - last >= UPLOAD_PURGE_EVERY_S:
        purge_uploads(upload_dir, retention_days)
    return path


def purge_uploads(upload_dir: Path, retention_days: float, now: float | None = None) -> int:
    """Delete the kept uploads (:data:`STORED_UPLOAD_NAME`) last written more than
    ``retention_days`` before ``now`` (epoch seconds, default: now); returns how many."""
    cutoff = (time.time() if now is None else now) - retention_days * 86400
    _last_upload_purge[upload_dir] = time.monotonic()
    deleted = 0
    with os.scandir(upload_dir) as entries:
        for entry in entries:
            if (
                STORED_UPLOAD_NAME.fullmatch(entry.name)
                and entry.is_file(follow_symlinks=False)
                and entry.stat(follow_symlinks=False).st_mtime < cutoff
            ):
                Path(entry.path).unlink(missing_ok=True)  # a concurrent purge may be first
                deleted += 1
    return deleted


def load_upload(
    path: Path, settings: ServeConfig, policy: DecisionPolicy
) -> tuple[Image.Image, np.ndarray]:
    """An uploaded file -> (photo, uint8 model input: what the model process takes, never a
    float32 copy here); raises :class:`ImageError` with the reason."""
    photo = decode_upload(read_upload(path, settings.max_upload_bytes), settings, policy.image_size)
    return photo, preprocess.model_pixels(photo, policy.image_size, policy.resample)


def http_status(error: ImageError) -> int:
    """413 for uploads over the limits, 415 for a file in no accepted format, 400 for anything
    else that is not a usable photo."""
    if isinstance(error, ImageTooLarge):
        return 413
    return 415 if isinstance(error, UnsupportedFormat) else 400


# ---------------------------------------------------------------------------- TFLite check


def folder_inputs(
    folder: Path, policy: DecisionPolicy, extensions: Sequence[str], limit: int | None = None
) -> tuple[np.ndarray, list[Path]]:
    """Model inputs of the photos under ``folder`` (any depth, in path order), and their files;
    at most ``limit``, spread evenly over the sorted list (so over every class folder)."""
    suffixes = {e.lower() for e in extensions}
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in suffixes)
    if not files:
        raise FileNotFoundError(f"no images under {folder}")
    if limit is not None and len(files) > limit:
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    inputs = np.stack(
        [preprocess.preprocess_file(p, policy.image_size, policy.resample) for p in files]
    )
    return inputs, files


def compare_backends(
    stored: StoredModel,
    image_dir: Path,
    extensions: Sequence[str],
    baseline: str = "tflite_fp32",
    candidate: str = "tflite_int8",
) -> dict[str, Any]:
    """How far ``candidate`` drifts from ``baseline`` on a folder of images (any depth).

    Reports label agreement and probability differences; when images sit in class folders
    (``<dir>/<class>/x.jpg``) also both accuracies, so the cost of quantization is visible.
    """
    policy = DecisionPolicy.from_stored(stored)
    inputs, files = folder_inputs(image_dir, policy, extensions)
    answers = {}
    for backend in (baseline, candidate):
        predictor = Predictor.from_stored(stored, backend)
        answers[backend] = policy.results(predictor.outputs(inputs))
    base, cand = answers[baseline], answers[candidate]
    positive = [
        (b["probabilities"][policy.positive_class], c["probabilities"][policy.positive_class])
        for b, c in zip(base, cand, strict=True)
    ]
    difference = np.abs(np.subtract(*zip(*positive, strict=True)))
    report: dict[str, Any] = {
        "images": len(files),
        "baseline": baseline,
        "candidate": candidate,
        "label_agreement": float(
            np.mean([b["label"] == c["label"] for b, c in zip(base, cand, strict=True)])
        ),
        "mean_abs_probability_difference": float(difference.mean()),
        "max_abs_probability_difference": float(difference.max()),
    }
    truth = [p.parent.name for p in files]
    if set(truth) <= set(policy.classes):
        for backend, results in answers.items():
            report[f"accuracy_{backend}"] = float(
                np.mean([r["label"] == t for r, t in zip(results, truth, strict=True)])
            )
    return report
