"""Out-of-distribution guard: does an upload look like the photos the model was trained on?

A classifier answers every input with one of its classes, a cat photo included. The guard
measures how far an image lies from the training photos in up to two feature spaces
(``serve.ood.features``):

- ``head``: the space the model's decision is made in, the input of its final Dense
  ``output`` layer (the penultimate features; for an ensemble, every member's, side by side);
- ``image_statistics``: how the photo looks, whatever the model: the colour, texture and edge
  statistics of :class:`~pox_pipeline.features.ColourTextureFeatures`. A network trained from
  scratch on a couple of hundred photos maps a cat or random noise close to its lesions; the
  statistics do not (benchmarks/ood_rates.py measures both).

In each space every feature is standardised with the training split's mean and spread, and
an image's distance is the mean Euclidean distance (per feature, i.e. divided by sqrt(dims))
to its ``k`` nearest training photos. The space's threshold is a quantile of the same distance
over the validation photos, which the reference never saw. An image's score is its largest
distance / threshold ratio over the spaces: above 1 it is out of distribution.

Fitted when a model is published (``select``, ``ensemble``) and stored beside it in the
BentoML model directory (:data:`OOD_FILE`); serving needs numpy only, plus the feature
extractor built on the model it already runs (Keras, or the same pass converted to TFLite).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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


HEAD = "head"
IMAGE_STATISTICS = "image_statistics"
FEATURE_SPACES = (HEAD, IMAGE_STATISTICS)


@dataclass(frozen=True)
class OODSettings:
    """``serve.ood``: the off switch (serving) and how the guard is fitted (publishing)."""

    enabled: bool
    features: tuple[str, ...]
    statistics_size: int
    k: int
    quantile: float
    batch_size: int

    @classmethod
    def from_cfg(cls, ood_cfg: Mapping[str, Any]) -> OODSettings:
        values = dict(ood_cfg)
        values["features"] = tuple(str(name) for name in values["features"])
        settings = cls(**values)
        unknown = set(settings.features) - set(FEATURE_SPACES)
        if unknown or not settings.features:
            raise ValueError(
                f"serve.ood.features={list(settings.features)}; choose from {FEATURE_SPACES}"
            )
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
        return {
            "method": METHOD,
            "feature_dims": int(self.reference.shape[1]),
            "reference_photos": int(self.reference.shape[0]),
            "k": self.k,
            "quantile": self.quantile,
            "threshold": self.threshold,
        }

    def arrays(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "scale": self.scale,
            "reference": self.reference.astype(np.float32),
            "k": self.k,
            "threshold": self.threshold,
            "quantile": self.quantile,
        }

    @classmethod
    def from_arrays(cls, stored: Mapping[str, Any]) -> Guard:
        return cls(
            mean=np.asarray(stored["mean"]),
            scale=np.asarray(stored["scale"]),
            reference=np.asarray(stored["reference"], np.float64),
            k=int(stored["k"]),
            threshold=float(stored["threshold"]),
            quantile=float(stored["quantile"]),
        )


@dataclass(frozen=True)
class GuardSet:
    """One :class:`Guard` per feature space; an image's score is its worst distance /
    threshold ratio (above 1: out of distribution)."""

    guards: dict[str, Guard]
    statistics_size: int

    @classmethod
    def fit(
        cls,
        train: Mapping[str, np.ndarray],
        val: Mapping[str, np.ndarray],
        settings: OODSettings,
    ) -> GuardSet:
        guards = {
            space: Guard.fit(train[space], val[space], settings.k, settings.quantile)
            for space in settings.features
        }
        return cls(guards, settings.statistics_size)

    def scores(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        ratios = [guard.distances(features[space]) / guard.threshold
                  for space, guard in self.guards.items()]  # fmt: skip
        return np.max(ratios, axis=0)

    def metadata(self) -> dict[str, Any]:
        """What travels in the model's metadata (and the model card)."""
        return {
            "rule": "out of distribution when the distance in any space exceeds its threshold",
            "statistics_size": self.statistics_size,
            "spaces": {space: guard.metadata() for space, guard in self.guards.items()},
        }

    def save(self, path: Path) -> Path:
        arrays: dict[str, Any] = {"statistics_size": self.statistics_size}
        for space, guard in self.guards.items():
            arrays.update({f"{space}.{key}": value for key, value in guard.arrays().items()})
        np.savez(path, **arrays)
        return path

    @classmethod
    def load(cls, path: Path) -> GuardSet:
        with np.load(path) as stored:
            spaces = dict.fromkeys(key.split(".")[0] for key in stored.files if "." in key)
            guards = {
                space: Guard.from_arrays({key.split(".", 1)[1]: stored[key]
                                          for key in stored.files if key.startswith(f"{space}.")})
                for space in spaces
            }  # fmt: skip
            return cls(guards, int(stored["statistics_size"]))


def verdict(score: float | None) -> dict[str, Any]:
    """The answer's OOD fields: ``in_distribution`` and, when false, ``ood_reason``.

    ``score`` None (or nan) means the check did not run (no guard stored with the model, or
    ``serve.ood.enabled: false``): the answer says so instead of pretending it passed.
    """
    if score is None or np.isnan(score):
        return {"in_distribution": True, "ood": {"checked": False}}
    inside = bool(score <= 1.0)
    answer: dict[str, Any] = {
        "in_distribution": inside,
        "ood": {"checked": True, "score": float(score)},
    }
    if not inside:
        answer["ood_reason"] = (
            f"{REASON} (its distance to the training photos is {score:.1f} times the limit "
            "that validation photos stay under)"
        )
    return answer


# ---------------------------------------------------------------------------- features (Keras)


def head_layers(model: keras.Layer) -> list[keras.Layer]:
    """Every final Dense ``output`` layer, searching nested sub-models in layer order (one per
    model; one per member in an ensemble)."""
    from pox_pipeline.features import walk_layers

    found = [
        layer for layer in walk_layers(model)
        if layer.name == OUTPUT_LAYER and not getattr(layer, "layers", None)
    ]  # fmt: skip
    if not found:
        raise ValueError(f"model {model.name!r} has no layer named {OUTPUT_LAYER!r}")
    return found


def outputs_with_head(model: keras.Model, image_size: int) -> Any:
    """A concrete function: the model's outputs with its head features appended, one
    (N, outputs + head) tensor from one pass. One tensor, so that TFLite converts it too."""
    import tensorflow as tf

    from pox_pipeline.inference import recorded_calls, traced

    heads = head_layers(model)

    def joined(batch: Any) -> Any:
        with recorded_calls(heads, "input") as recorded:
            outputs = model(batch, training=False)
        flat = [tf.reshape(tensor, [tf.shape(tensor)[0], -1]) for tensor in recorded]
        return tf.concat([outputs, *flat], axis=-1)

    return traced(joined, image_size)


@dataclass(frozen=True)
class FeatureExtractor:
    """Model outputs and the guard's features of a float32 (N, S, S, 3) batch in [0, 255]."""

    joined: Callable[[np.ndarray], np.ndarray]  # outputs_with_head, compiled for a backend
    n_outputs: int
    statistics: Callable[[np.ndarray], np.ndarray] | None  # image_statistics, when guarded

    def outputs(self, batch: np.ndarray) -> np.ndarray:
        return self.joined(batch)[:, : self.n_outputs]

    def __call__(
        self, views: np.ndarray, n_views: int = 1
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``views``: the images' TTA views, view-major (:func:`inference.tta_views`), the first
        view the images themselves. Outputs and head features are averaged over the views; the
        image statistics (colour, texture, edges: the same for a flipped photo) are taken of
        the images alone, as at fitting."""
        from pox_pipeline.inference import mean_over_views

        joined = mean_over_views(self.joined(views), n_views)
        features = {HEAD: joined[:, self.n_outputs :]}
        if self.statistics is not None:
            features[IMAGE_STATISTICS] = self.statistics(views[: len(views) // n_views])
        return joined[:, : self.n_outputs], features


def feature_extractor(
    model: keras.Model,
    image_size: int,
    spaces: Sequence[str],
    statistics_size: int,
    compile_joined: Callable[[Any], Callable[[np.ndarray], np.ndarray]] | None = None,
) -> FeatureExtractor:
    """The answer and the guard's features, each traced once.

    ``compile_joined`` runs the traced outputs-with-head function: as traced (default), or
    converted by the serving backend (TFLite), so a served answer and its head features come
    from one pass of the model being served. The image statistics stay a TF function (their
    antialiased resize has no TFLite op); they are the model-free half of the guard.
    """
    import keras

    from pox_pipeline.features import ColourTextureFeatures
    from pox_pipeline.inference import run_traced, traced

    statistics = None
    if IMAGE_STATISTICS in spaces:
        resize = keras.layers.Resizing(statistics_size, statistics_size, antialias=True)
        describe = ColourTextureFeatures()
        statistics = run_traced(traced(lambda batch: describe(resize(batch)), image_size))
    joined = (compile_joined or run_traced)(outputs_with_head(model, image_size))
    return FeatureExtractor(joined, int(model.output_shape[-1]), statistics)


# ---------------------------------------------------------------------------- publishing


def features_of(
    model: keras.Model, images: np.ndarray, settings: OODSettings
) -> dict[str, np.ndarray]:
    """The guard's features of many images, in batches of ``settings.batch_size``."""
    if not len(images):
        raise ValueError("no images to compute features of")
    extract = feature_extractor(model, images.shape[1], settings.features, settings.statistics_size)
    parts = [extract(images[start : start + settings.batch_size])[1]
             for start in range(0, len(images), settings.batch_size)]  # fmt: skip
    return {space: np.concatenate([part[space] for part in parts]) for space in settings.features}


def fit_guard(
    model: keras.Model, train: np.ndarray, val: np.ndarray, settings: OODSettings
) -> GuardSet:
    """The guard of a model about to be published: reference = its training photos,
    thresholds from its validation photos (model inputs, as ``data.load_split`` gives them)."""
    return GuardSet.fit(
        features_of(model, train, settings), features_of(model, val, settings), settings
    )
