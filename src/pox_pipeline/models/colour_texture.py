"""Hand-crafted colour and texture statistics of a photo, as a Keras layer without weights.

With 137 training photos a linear model on a few hundred fixed statistics matched every
network trained from scratch on MSLD (docs/results-msld.md), so the statistics live inside
the saved ``.keras`` model: serving, TTA and the ensemble use it like any other model. The
layer is registered with Keras; import this module before ``keras.saving.load_model``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

# ITU-R BT.601 RGB -> YCbCr (inputs and outputs in [0, 1]; chroma offset 0.5).
YCBCR_MATRIX = (
    (0.299, -0.168736, 0.5),
    (0.587, -0.331264, -0.418688),
    (0.114, 0.5, -0.081312),
)
YCBCR_OFFSET = (0.0, 0.5, 0.5)
COLOUR_CHANNELS = 9  # RGB, HSV, YCbCr
# Local binary patterns: 8 neighbours at radius r, clockwise from the top-left corner.
LBP_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))
LBP_BINS = len(LBP_NEIGHBOURS) + 2  # rotation-invariant uniform codes 0..8, non-uniform 9


@keras.saving.register_keras_serializable(package="pox_pipeline")
class ColourTextureFeatures(keras.layers.Layer):
    """Per image: for each of 9 colour channels (RGB, HSV, YCbCr) mean, std, quantiles and a
    histogram; rotation-invariant uniform LBP histograms at several radii (texture); and a
    histogram of grey-level gradient magnitudes (edges). Input [0, 255] RGB, output
    (batch, :meth:`feature_count`) float32; nothing to train."""

    def __init__(
        self,
        quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95),
        histogram_bins: int = 12,
        lbp_radii: Sequence[int] = (1, 2, 4),
        gradient_bins: int = 12,
        gradient_range: float = 60.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.quantiles = [float(q) for q in quantiles]
        self.histogram_bins = int(histogram_bins)
        self.lbp_radii = [int(r) for r in lbp_radii]
        self.gradient_bins = int(gradient_bins)
        self.gradient_range = float(gradient_range)

    def feature_count(self) -> int:
        per_channel = 2 + len(self.quantiles) + self.histogram_bins
        return (
            COLOUR_CHANNELS * per_channel + LBP_BINS * len(self.lbp_radii) + self.gradient_bins
        )

    def compute_output_shape(self, input_shape: tuple[Any, ...]) -> tuple[Any, ...]:
        return (input_shape[0], self.feature_count())

    def call(self, images: Any) -> Any:
        images = ops.cast(images, "float32")
        rgb = ops.clip(images / 255.0, 0.0, 1.0)
        ycbcr = ops.matmul(rgb, ops.array(YCBCR_MATRIX)) + ops.array(YCBCR_OFFSET)
        colour = ops.concatenate([rgb, rgb_to_hsv(rgb), ycbcr], axis=-1)
        # (batch, channel, pixel): statistics run along the last axis
        pixels = images.shape[1] * images.shape[2]  # static: the model's input size
        values = ops.transpose(ops.reshape(colour, (-1, pixels, COLOUR_CHANNELS)), (0, 2, 1))
        grey = ops.squeeze(ops.image.rgb_to_grayscale(ops.clip(images, 0.0, 255.0)), -1)
        parts = [
            self._moments(values),
            self._quantiles(values),
            histogram(values, self.histogram_bins, 0.0, 1.0),
            *(lbp_histogram(grey, radius) for radius in self.lbp_radii),
            self._gradient_histogram(grey),
        ]
        flat = [ops.reshape(part, (-1, math.prod(part.shape[1:]))) for part in parts]
        return ops.concatenate(flat, axis=-1)

    @staticmethod
    def _moments(values: Any) -> Any:
        return ops.stack([ops.mean(values, -1), ops.std(values, -1)], -1)

    def _quantiles(self, values: Any) -> Any:
        ordered = ops.sort(values, axis=-1)
        last = values.shape[-1] - 1
        picks = [ordered[..., round(q * last)] for q in self.quantiles]  # nearest rank
        return ops.stack(picks, axis=-1)

    def _gradient_histogram(self, grey: Any) -> Any:
        """Central differences inside the border; the last bin also holds larger gradients."""
        gx = (grey[:, 1:-1, 2:] - grey[:, 1:-1, :-2]) / 2.0
        gy = (grey[:, 2:, 1:-1] - grey[:, :-2, 1:-1]) / 2.0
        magnitude = ops.reshape(ops.sqrt(gx * gx + gy * gy), (-1, 1, math.prod(gx.shape[1:])))
        return histogram(magnitude, self.gradient_bins, 0.0, self.gradient_range)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "quantiles": self.quantiles,
            "histogram_bins": self.histogram_bins,
            "lbp_radii": self.lbp_radii,
            "gradient_bins": self.gradient_bins,
            "gradient_range": self.gradient_range,
        }


def rgb_to_hsv(rgb: Any) -> Any:
    """``tf.image.rgb_to_hsv`` in elementwise ops, which TFLite has built in (its RGBToHSV
    kernel is not): hue, saturation and value in [0, 1], hue 0 for greys."""
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = ops.max(rgb, axis=-1)
    spread = value - ops.min(rgb, axis=-1)
    safe = ops.where(spread > 0, spread, 1.0)
    hue = ops.where(
        value == red,
        (green - blue) / safe,
        ops.where(value == green, (blue - red) / safe + 2.0, (red - green) / safe + 4.0),
    )
    hue = ops.where(spread > 0, hue / 6.0, 0.0)
    hue = ops.where(hue < 0, hue + 1.0, hue)
    saturation = ops.where(value > 0, spread / ops.where(value > 0, value, 1.0), 0.0)
    return ops.stack([hue, saturation, value], axis=-1)


def histogram(values: Any, bins: int, low: float, high: float) -> Any:
    """Fraction of the last axis in each of ``bins`` equal bins of [low, high] (values from
    the last edge up, ``high`` and beyond included, count in the last bin), by cumulative
    comparisons: no (pixels x bins) one-hot tensor."""
    edges = [low + (high - low) * k / bins for k in range(1, bins)]
    at_least = [ops.ones_like(values[..., 0])]
    at_least += [ops.mean(ops.cast(values >= edge, "float32"), -1) for edge in edges]
    at_least.append(ops.zeros_like(values[..., 0]))
    cumulative = ops.stack(at_least, -1)
    return cumulative[..., :-1] - cumulative[..., 1:]


def lbp_histogram(grey: Any, radius: int) -> Any:
    """Rotation-invariant uniform LBP (Ojala et al. 2002) of each interior pixel, as fractions
    of :data:`LBP_BINS` codes, shape (batch, LBP_BINS): a neighbour >= the centre is a 1;
    a pattern with at most two 0/1 changes around the circle is its count of ones, else 9."""
    r = radius
    centre = grey[:, r:-r, r:-r]
    height, width = grey.shape[1], grey.shape[2]
    bits = [
        ops.cast(
            grey[:, r + dy * r : height - r + dy * r, r + dx * r : width - r + dx * r] >= centre,
            "float32",
        )
        for dy, dx in LBP_NEIGHBOURS
    ]
    ones = sum(bits)
    changes = sum(ops.abs(bits[i] - bits[(i + 1) % len(bits)]) for i in range(len(bits)))
    code = ops.where(changes <= 2, ones, float(LBP_BINS - 1))
    code = ops.reshape(code, (-1, math.prod(code.shape[1:])))
    return ops.stack([ops.mean(ops.cast(code == k, "float32"), -1) for k in range(LBP_BINS)], -1)
