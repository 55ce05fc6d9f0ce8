"""The model as the service runs it: one load, batched compiled calls with the guard's and
monitoring's features from the same pass, and the Grad-CAM explanation.

TensorFlow is imported inside the functions that run the model, so the API process (which only
decodes uploads and formats JSON) starts without it.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from pox_pipeline.common import preprocess
from pox_pipeline.guard import ood
from pox_pipeline.models import forward
from pox_pipeline.models.inference import (
    load_stored_model,
    mean_over_views,
    recorded_calls,
    run_traced,
    traced,
    tta_views,
)
from pox_pipeline.serving import monitor, tflite
from pox_pipeline.serving.policy import DecisionPolicy
from pox_pipeline.serving.settings import BACKENDS, HeatmapConfig

if TYPE_CHECKING:
    import keras
    from bentoml import Model as StoredModel



# Grad-CAM colours: a perceptually ordered dark-blue -> cyan -> yellow -> red ramp ("jet"-like),
# interpolated linearly between these stops so serving needs no matplotlib.
COLORMAP_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
COLORMAP_RGB = np.array(
    [[48, 18, 140], [30, 130, 240], [60, 220, 150], [250, 210, 40], [220, 30, 20]],
    dtype=np.float64,
)



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
                "says why): choose one of those, or list it in publish.backends and publish"
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
        guarded = self.guard.guards if self.guard else []
        spaces = list(forward.FEATURE_SPACES if self.basis else guarded)
        if not spaces and self.runner is None:
            self._features = None
            self._run = run_traced(
                traced(lambda batch: self.model(batch, training=False), policy.image_size)
            )
        else:  # one pass gives the answer and the guard's head features
            self._features = forward.feature_extractor(
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

    from pox_pipeline.models.inference import walk_layers

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


