"""The model's forward pass as the service runs it: one traced call gives the answer, the
head's input features and the photo's colour/texture statistics (what the guard and
monitoring measure, and what TFLite converts). Model-agnostic: any classifier whose final
Dense layer is named ``output``."""


from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import keras


OUTPUT_LAYER = "output"  # architectures.classifier_head's name for the final Dense layer
HEAD = "head"
OUTPUTS = "outputs"  # outputs_with_head's other tensor: the model's answer
IMAGE_STATISTICS = "image_statistics"
FEATURE_SPACES = (HEAD, IMAGE_STATISTICS)


def head_layers(model: keras.Layer) -> list[keras.Layer]:
    """Every final Dense ``output`` layer, searching nested sub-models in layer order (one per
    model; one per member in an ensemble)."""
    from pox_pipeline.models.inference import walk_layers

    found = [
        layer for layer in walk_layers(model)
        if layer.name == OUTPUT_LAYER and not getattr(layer, "layers", None)
    ]  # fmt: skip
    if not found:
        raise ValueError(f"model {model.name!r} has no layer named {OUTPUT_LAYER!r}")
    return found


def statistics_pool(image_size: int, statistics_size: int) -> int:
    """The average-pooling factor that shrinks a model input towards ``statistics_size``
    pixels a side (``image_size // statistics_size``, at least 1)."""
    return max(1, image_size // statistics_size)


def image_statistics(image_size: int, statistics_size: int) -> Callable[[Any], Any]:
    """A batch in [0, 255] -> its colour and texture statistics
    (:class:`~pox_pipeline.models.colour_texture.ColourTextureFeatures`) of the photo
    average-pooled by :func:`statistics_pool`: plain TFLite ops, and few enough pixels to cost a
    fraction of the model's pass."""
    import keras

    from pox_pipeline.models.colour_texture import ColourTextureFeatures

    pool = statistics_pool(image_size, statistics_size)
    # Fixed names: Keras numbers unnamed layers per process, and the numbers would end up in
    # the converted tensors' names, so the same model would convert to other bytes (and be
    # published again) on a second conversion.
    describe = ColourTextureFeatures(name=IMAGE_STATISTICS)
    if pool == 1:
        return describe
    shrink = keras.layers.AveragePooling2D(pool, name=f"{IMAGE_STATISTICS}_pool")
    return lambda batch: describe(shrink(batch))


def outputs_with_head(model: keras.Model, image_size: int, statistics_size: int | None) -> Any:
    """A concrete function: {OUTPUTS: the model's outputs, HEAD: its head features} and, unless
    ``statistics_size`` is None, {IMAGE_STATISTICS: :func:`image_statistics`}, from one pass.
    Separate named tensors, so that TFLite converts them all and full-integer quantisation
    gives each its own scale."""
    import tensorflow as tf

    from pox_pipeline.models.inference import recorded_calls, traced

    heads = head_layers(model)
    statistics = None if statistics_size is None else image_statistics(image_size, statistics_size)

    def answer(batch: Any) -> Any:
        with recorded_calls(heads, "input") as recorded:
            outputs = model(batch, training=False)
        flat = [tf.reshape(tensor, [tf.shape(tensor)[0], -1]) for tensor in recorded]
        both = {OUTPUTS: outputs, HEAD: tf.concat(flat, axis=-1)}
        return both if statistics is None else {**both, IMAGE_STATISTICS: statistics(batch)}

    return traced(answer, image_size)


@dataclass(frozen=True)
class FeatureExtractor:
    """Model outputs and the guard's features of a float32 (N, S, S, 3) batch in [0, 255]."""

    run: Callable[[np.ndarray], dict[str, np.ndarray]]  # outputs_with_head, run by a backend
    spaces: tuple[str, ...]
    # image_statistics for a run converted without them (full-integer TFLite); else None
    statistics: Callable[[np.ndarray], np.ndarray] | None = None

    def outputs(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)[OUTPUTS]

    def answer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every tensor of the pass: outputs, head features and (when wanted) statistics."""
        answer = self.run(batch)
        if IMAGE_STATISTICS in self.spaces and IMAGE_STATISTICS not in answer:
            answer = {**answer, IMAGE_STATISTICS: self.statistics(batch)}
        return answer

    def __call__(
        self, views: np.ndarray, n_views: int = 1
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``views``: the images' TTA views, view-major (:func:`inference.tta_views`). Outputs
        and every feature space are averaged over the views (the statistics of a flipped photo
        are its own: the mean is theirs), as at fitting."""
        from pox_pipeline.models.inference import mean_over_views

        answer = self.answer(views)
        features = {space: mean_over_views(answer[space], n_views) for space in self.spaces}
        return mean_over_views(answer[OUTPUTS], n_views), features


def feature_extractor(
    model: keras.Model,
    image_size: int,
    spaces: Sequence[str],
    statistics_size: int,
    runner: Any = None,
) -> FeatureExtractor:
    """The answer and the guard's features from one traced pass.

    ``runner`` (a :class:`tflite.Runner`) answers for :func:`outputs_with_head` when serving a
    TFLite backend: the stored conversion, the image statistics inside it, so a served answer
    and all its features come from one pass of the model being served. A conversion without
    the statistics (full-integer quantisation cannot carry them) gets them from a TF function.
    """
    from pox_pipeline.models.inference import run_traced, traced

    spaces = tuple(spaces)
    wanted = statistics_size if IMAGE_STATISTICS in spaces else None
    if runner is None:
        return FeatureExtractor(
            run_traced(outputs_with_head(model, image_size, wanted)), spaces
        )
    statistics = None
    if wanted is not None and IMAGE_STATISTICS not in runner.output_names:
        statistics = run_traced(traced(image_statistics(image_size, wanted), image_size))
    return FeatureExtractor(runner, spaces, statistics)


