"""Out-of-distribution guard: does an upload look like the photos the model was trained on?

A classifier answers every input with one of its classes, a cat photo included. The guard
measures how far an image lies from the training photos in the space the model's decision is
made in: the input of its final Dense ``output`` layer (the penultimate features; for an
ensemble, every member's, side by side). Each feature is standardised with the training
split's mean and spread, and the distance of an image is the mean Euclidean distance (per
feature, i.e. divided by sqrt(dims)) to its ``k`` nearest training photos. The threshold is a
quantile of the same distance over the validation photos, which the reference never saw, so
it is the rate at which genuine photos like those are flagged.

Fitted when a model is published (``select``, ``ensemble``) and stored beside it in the
BentoML model directory (:data:`OOD_FILE`); serving needs numpy only, plus the feature
extractor built on the Keras model it already runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import keras

OOD_FILE = "ood.npz"  # inside the BentoML model directory, beside model.keras
OUTPUT_LAYER = "output"  # models.classifier_head's name for the final Dense layer
METHOD = "knn"
# A feature with (almost) no spread on the training photos is scaled by this share of the
# mean spread instead: such a unit lighting up is a strong sign of an unfamiliar input, and
# must not divide by zero.
MIN_SCALE_RATIO = 0.1
REASON = "this does not look like a skin photo like those the model was trained on"


@dataclass(frozen=True)
class OODSettings:
    """``serve.ood``: the off switch (serving) and how the guard is fitted (publishing)."""

    enabled: bool
    k: int
    quantile: float
    batch_size: int

    @classmethod
    def from_cfg(cls, ood_cfg: Mapping[str, Any]) -> OODSettings:
        settings = cls(**dict(ood_cfg))
        if settings.k < 1:
            raise ValueError(f"serve.ood.k must be at least 1, got {settings.k}")
        if not 0 < settings.quantile <= 1:
            raise ValueError(f"serve.ood.quantile must be in (0, 1], got {settings.quantile}")
        return settings


# ---------------------------------------------------------------------------- the distance rule


@dataclass(frozen=True)
class Guard:
    """The fitted rule: reference features (standardised), their scaling, k and the threshold."""

    mean: np.ndarray
    scale: np.ndarray
    reference: np.ndarray
    k: int
    threshold: float
    quantile: float

    @classmethod
    def fit(
        cls, train_features: np.ndarray, val_features: np.ndarray, k: int, quantile: float
    ) -> Guard:
        """Reference = the training photos; threshold = ``quantile`` of the validation
        photos' distances (photos the reference does not contain, like an upload)."""
        train = np.asarray(train_features, np.float64)
        if len(train) < k:
            raise ValueError(f"{len(train)} training photos are fewer than k={k}")
        mean = train.mean(axis=0)
        spread = train.std(axis=0)
        floor = MIN_SCALE_RATIO * float(spread.mean()) if spread.any() else 1.0
        scale = np.maximum(spread, floor)
        unfitted = cls(mean, scale, (train - mean) / scale, k, np.inf, quantile)
        val_distances = unfitted.distances(val_features)
        threshold = float(np.quantile(val_distances, quantile, method="higher"))
        return cls(mean, scale, unfitted.reference, k, threshold, quantile)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mean distance (per feature) of each row to its k nearest reference photos."""
        z = (np.asarray(features, np.float64) - self.mean) / self.scale
        squared = (
            (z**2).sum(axis=1, keepdims=True)
            - 2 * z @ self.reference.T
            + (self.reference**2).sum(axis=1)
        )
        nearest = np.sort(np.sqrt(np.maximum(squared, 0.0)), axis=1)[:, : self.k]
        return nearest.mean(axis=1) / np.sqrt(z.shape[1])

    def metadata(self) -> dict[str, Any]:
        """What travels in the model's metadata (and the model card)."""
        return {
            "method": METHOD,
            "feature": f"input of the final Dense '{OUTPUT_LAYER}' layer",
            "feature_dims": int(self.reference.shape[1]),
            "reference_photos": int(self.reference.shape[0]),
            "k": self.k,
            "quantile": self.quantile,
            "threshold": self.threshold,
        }

    def save(self, path: Path) -> Path:
        np.savez(
            path,
            mean=self.mean,
            scale=self.scale,
            reference=self.reference.astype(np.float32),
            k=self.k,
            threshold=self.threshold,
            quantile=self.quantile,
        )
        return path

    @classmethod
    def load(cls, path: Path) -> Guard:
        with np.load(path) as stored:
            return cls(
                mean=stored["mean"],
                scale=stored["scale"],
                reference=stored["reference"].astype(np.float64),
                k=int(stored["k"]),
                threshold=float(stored["threshold"]),
                quantile=float(stored["quantile"]),
            )


def verdict(distance: float | None, threshold: float | None) -> dict[str, Any]:
    """The answer's OOD fields: ``in_distribution`` and, when false, ``ood_reason``.

    ``distance`` None (or nan) means the check did not run (no guard stored with the model,
    or ``serve.ood.enabled: false``): the answer says so instead of pretending it passed.
    """
    if distance is None or threshold is None or np.isnan(distance):
        return {"in_distribution": True, "ood": {"checked": False}}
    inside = bool(distance <= threshold)
    answer: dict[str, Any] = {
        "in_distribution": inside,
        "ood": {"checked": True, "distance": float(distance), "threshold": float(threshold)},
    }
    if not inside:
        answer["ood_reason"] = (
            f"{REASON} (distance {distance:.2f} to the nearest training photos is above "
            f"{threshold:.2f}, the limit that validation photos stay under)"
        )
    return answer


# ---------------------------------------------------------------------------- features (Keras)


def head_layers(model: keras.Layer) -> list[keras.Layer]:
    """Every final Dense ``output`` layer, searching nested sub-models in layer order (one per
    model; one per member in an ensemble)."""
    found = []

    def walk(layer: keras.Layer) -> None:
        if layer.name == OUTPUT_LAYER and not getattr(layer, "layers", None):
            found.append(layer)
        for sub in getattr(layer, "layers", None) or ():
            walk(sub)

    walk(model)
    if not found:
        raise ValueError(f"model {model.name!r} has no layer named {OUTPUT_LAYER!r}")
    return found


@contextmanager
def captured_inputs(layers: Sequence[keras.Layer]) -> Iterator[list[Any]]:
    """Record the input tensor of each call of ``layers`` while inside the block (the same
    instance-level ``call`` hook as ``serve.captured_output``, on the way in)."""
    inputs: list[Any] = []

    def hook(layer: keras.Layer) -> None:
        original = layer.call

        def recording_call(features: Any, *args: Any, **kwargs: Any) -> Any:
            inputs.append(features)
            return original(features, *args, **kwargs)

        layer.call = recording_call

    for layer in layers:
        hook(layer)
    try:
        yield inputs
    finally:
        for layer in layers:
            del layer.call


def feature_extractor(
    model: keras.Model, image_size: int
) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A compiled call: float32 (N, S, S, 3) in [0, 255] -> (model outputs, head features).

    Traced once with the head layers hooked, so serving gets both from one pass.
    """
    import tensorflow as tf

    heads = head_layers(model)
    signature = [tf.TensorSpec([None, image_size, image_size, 3], tf.float32)]

    def both(batch: Any) -> tuple[Any, Any]:
        with captured_inputs(heads) as recorded:
            outputs = model(batch, training=False)
        flat = [tf.reshape(tensor, [tf.shape(tensor)[0], -1]) for tensor in recorded]
        return outputs, tf.concat(flat, axis=-1)

    concrete = tf.function(both, input_signature=signature).get_concrete_function()

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outputs, features = concrete(tf.constant(batch, tf.float32))
        return outputs.numpy(), features.numpy()

    return run


def features_of(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Head features of many images, in batches."""
    if not len(images):
        raise ValueError("no images to compute features of")
    extract = feature_extractor(model, images.shape[1])
    batches = range(0, len(images), batch_size)
    return np.concatenate([extract(images[start : start + batch_size])[1] for start in batches])


# ---------------------------------------------------------------------------- publishing


def fit_guard(
    model: keras.Model, train: np.ndarray, val: np.ndarray, settings: OODSettings
) -> Guard:
    """The guard of a model about to be published: reference = its training photos,
    threshold from its validation photos (model inputs, as ``data.load_split`` gives them)."""
    return Guard.fit(
        features_of(model, train, settings.batch_size),
        features_of(model, val, settings.batch_size),
        settings.k,
        settings.quantile,
    )
