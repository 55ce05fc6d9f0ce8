"""Inference shared by evaluation, publishing and serving: the test-time augmentation views,
loading a saved model, and storing one in BentoML. Offline stages import this module, never
``serve`` (the HTTP-free serving core), so editing the service re-runs no evaluation."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pox_pipeline.common import paths

if TYPE_CHECKING:
    import keras
    from bentoml import Model as StoredModel

# Test-time augmentation (evaluate.tta, shipped as the model's ``tta`` metadata).
NO_TTA = "none"
TTA_MODES = (NO_TTA, "flips")
# Image array axes of a (N, S, S, 3) batch: rows flip vertically, columns horizontally.
ROW_AXIS, COLUMN_AXIS = 1, 2


def tta_views(batch: np.ndarray, mode: str) -> list[np.ndarray]:
    """The views of a (N, S, S, 3) batch that ``mode`` averages over.

    ``none``: the batch itself; ``flips``: identity, horizontal flip, vertical flip and both
    (a lesion photo has no preferred orientation). The flips are numpy views, not copies.
    Evaluation and serving both take their views from here, so they average the same thing.
    """
    if mode not in TTA_MODES:
        raise ValueError(f"tta={mode!r}; choose one of {TTA_MODES}")
    if mode == NO_TTA:
        return [batch]
    return [
        batch,
        np.flip(batch, axis=COLUMN_AXIS),
        np.flip(batch, axis=ROW_AXIS),
        np.flip(batch, axis=(ROW_AXIS, COLUMN_AXIS)),
    ]


def mean_over_views(outputs: np.ndarray, n_views: int) -> np.ndarray:
    """Outputs of the concatenated views (view-major, as :func:`tta_views` lists them) ->
    each image's mean output (probabilities are averaged, not logits)."""
    return outputs.reshape(n_views, -1, *outputs.shape[1:]).mean(axis=0)


def predict_scores(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Model outputs in batches through Keras' compiled predict step (not image by image)."""
    batches = [
        np.asarray(model.predict_on_batch(images[start : start + batch_size]))
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(batches).astype(np.float64)


def model_outputs(
    model: keras.Model, images: np.ndarray, batch_size: int, tta: str
) -> np.ndarray:
    """Model outputs averaged over the TTA views of :func:`tta_views` (what the service's
    ``Predictor.outputs`` computes); each view goes through in batches of ``batch_size``,
    so memory stays that of one view."""
    views = tta_views(images, tta)
    return np.mean([predict_scores(model, view, batch_size) for view in views], axis=0)


def median_call_ms(run: Callable[[np.ndarray], Any], batch: np.ndarray, repeats: int) -> float:
    """Median wall milliseconds of ``run(batch)`` over ``repeats`` calls, after one untimed."""
    import time

    run(batch)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(batch)
        timings.append(time.perf_counter() - started)
    return float(np.median(timings) * 1000)


def flops_per_photo(model: keras.Model, image_size: int, tta: str) -> float:
    """Floating-point operations to answer one photo (all its TTA views), counted by
    TensorFlow's profiler on the frozen graph: what a family costs to serve, the same on every
    machine (a measured latency would make ``select`` depend on the load of the moment)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    views = len(tta_views(np.zeros((1, 1, 1, 3), np.float32), tta))
    spec = tf.TensorSpec([views, image_size, image_size, 3], tf.float32)
    function = tf.function(lambda batch: model(batch, training=False))
    frozen = convert_variables_to_constants_v2(function.get_concrete_function(spec))
    profiler = tf.compat.v1.profiler
    options = profiler.ProfileOptionBuilder(
        profiler.ProfileOptionBuilder.float_operation()
    ).with_empty_output().build()
    with tf.Graph().as_default() as graph:
        tf.graph_util.import_graph_def(frozen.graph.as_graph_def(), name="")
        counted = profiler.profile(graph=graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op",
                                   options=options)  # fmt: skip
    return float(counted.total_float_ops)


def traced(function: Callable[[Any], Any], image_size: int) -> Any:
    """``function`` traced once as a TF concrete function of a float32 (N, S, S, 3) batch."""
    import tensorflow as tf

    signature = [tf.TensorSpec([None, image_size, image_size, 3], tf.float32)]
    return tf.function(function, input_signature=signature).get_concrete_function()


def run_traced(function: Any) -> Callable[[np.ndarray], Any]:
    """A concrete function as a numpy call (how Keras serving and publishing run it): a tensor
    (or a dict of them) out as numpy."""
    import tensorflow as tf

    return lambda batch: tf.nest.map_structure(
        lambda tensor: tensor.numpy(), function(tf.constant(batch, tf.float32))
    )


@contextmanager
def recorded_calls(layers: Sequence[keras.Layer], record: str) -> Iterator[list[Any]]:
    """While inside the block, record each call of ``layers``: its ``"input"`` (the first
    argument) or its ``"output"`` tensor. Wrapping each layer's own ``call`` works wherever
    the layer sits (plain, nested in a sub-model, shared between chained sub-models), where
    building a second Keras model from a symbolic tensor fails for nested graphs. Grad-CAM
    records the last conv's output, the OOD guard the inputs of the output layers."""
    if record not in ("input", "output"):
        raise ValueError(f"record must be 'input' or 'output', got {record!r}")
    recorded: list[Any] = []

    def hook(layer: keras.Layer) -> None:
        original = layer.call

        def recording_call(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            recorded.append(args[0] if record == "input" else output)
            return output

        layer.call = recording_call

    for layer in layers:
        hook(layer)
    try:
        yield recorded
    finally:
        for layer in layers:
            del layer.call  # the class's method shows through again


def walk_layers(layer: keras.Layer) -> Iterator[keras.Layer]:
    """A layer and, depth first, every layer nested in it (sub-models of a chain, a VGG16
    base, ensemble members): the one way this package searches a model's layers."""
    yield layer
    for sub in getattr(layer, "layers", None) or ():
        yield from walk_layers(sub)


def custom_objects(model: keras.Layer) -> dict[str, type]:
    """Registered name -> class of every layer in the model (nested models included) that is
    not Keras's own, such as colour_texture's ``ColourTextureFeatures``.

    Keras 3 rebuilds such a layer only from its registered class, so a saved model that holds
    one loads only where that class is imported or handed over as a custom object.
    """
    import keras

    return {
        keras.saving.get_registered_name(type(layer)): type(layer)
        for layer in walk_layers(model)
        if not type(layer).__module__.startswith("keras.")
    }


def load_keras_model(path: Path) -> keras.Model:
    """A saved ``.keras`` model (file or unzipped directory), uncompiled; this project's custom
    layers registered first."""
    import keras

    from pox_pipeline.models import colour_texture  # noqa: F401 - registers ColourTextureFeatures

    return keras.saving.load_model(path, compile=False)


def load_stored_model(model_dir: Path) -> keras.Model:
    """The Keras model of a BentoML store entry: saved by :func:`store_keras_model` (an unzipped
    ``.keras`` directory), or as ``model.keras`` inside it by versions before that."""
    legacy = Path(model_dir) / paths.MODEL_FILE
    return load_keras_model(legacy if legacy.is_file() else Path(model_dir))


def store_keras_model(
    name: str,
    model: keras.Model,
    labels: dict[str, str] | None,
    metadata: dict[str, Any],
    extra_files: Mapping[str, Path] | None = None,
) -> StoredModel:
    """Save a Keras model to the BentoML store with ``bentoml.keras`` so that
    ``bentoml.keras.load_model(tag)`` rebuilds it in any Python with Keras, this package not
    imported: its layers travel as custom objects pickled by value, not by reference.
    ``extra_files`` (name -> file: the guard, the model card) are copied beside it."""
    import bentoml
    import cloudpickle

    objects = custom_objects(model)
    modules = {sys.modules[cls.__module__] for cls in objects.values()}
    for module in modules:
        cloudpickle.register_pickle_by_value(module)
    try:
        stored = bentoml.keras.save_model(
            name, model, labels=labels, metadata=metadata, custom_objects=objects or None
        )
    finally:
        for module in modules:
            cloudpickle.unregister_pickle_by_value(module)
    stored = bentoml.models.get(stored.tag)  # its place in the store, not the staging folder
    for file_name, path in (extra_files or {}).items():
        shutil.copyfile(path, Path(stored.path) / file_name)
    return stored
