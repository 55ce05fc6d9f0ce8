"""Temperature scaling as the service applies it: numpy only, so the API process that shows
calibrated probabilities does not import scikit-learn, pandas or SciPy (``metrics`` does,
for fitting the temperature and everything else evaluation needs)."""

from __future__ import annotations

import numpy as np

# Probabilities are clipped this far from 0 and 1 before a log (log loss, and the logits
# that temperature scaling divides).
PROBABILITY_EPS = 1e-7
NO_CALIBRATION = "none"
CALIBRATION_METHODS = (NO_CALIBRATION, "temperature")
# Dividing logits by 1 changes nothing: the temperature of an uncalibrated model.
IDENTITY_TEMPERATURE = 1.0


def binary_logits(score: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(score, dtype=np.float64), PROBABILITY_EPS, 1.0 - PROBABILITY_EPS)
    return np.log(p) - np.log1p(-p)


def log_probabilities(proba: np.ndarray) -> np.ndarray:
    """Log-probabilities: logits up to a per-row constant, which softmax ignores."""
    return np.log(np.clip(np.asarray(proba, dtype=np.float64), PROBABILITY_EPS, 1.0))


def temperature_scale(outputs: np.ndarray, temperature: float, binary: bool) -> np.ndarray:
    """Calibrated probabilities: ``sigmoid(logit(p) / T)`` (binary, P(positive) of any shape)
    or ``softmax(log(p) / T)`` over the last axis (multi-class).

    T = 1 returns the input unchanged (bit for bit, so an uncalibrated model's probabilities
    and thresholds are exactly the model's own); T > 1 softens, T < 1 sharpens. Dividing
    logits by a positive T keeps the ranking and the argmax.
    """
    outputs = np.asarray(outputs, dtype=np.float64)
    if temperature == IDENTITY_TEMPERATURE:
        return outputs
    if binary:
        # logits are bounded by the clipping (|z| < 17), so exp cannot overflow
        return 1.0 / (1.0 + np.exp(-binary_logits(outputs) / temperature))
    z = log_probabilities(outputs) / temperature
    z -= z.max(axis=-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


def class_probabilities(
    outputs: np.ndarray, temperature: float, positive_index: int
) -> np.ndarray:
    """Model outputs -> (N, C) temperature-scaled probabilities in the classes' order.

    One output unit is a binary model's sigmoid, P(class ``positive_index``): it becomes two
    columns. Wider outputs are softmax rows and stay rows. Evaluation and serving both read
    model outputs through here.
    """
    outputs = np.asarray(outputs, dtype=np.float64)
    outputs = outputs.reshape(len(outputs), -1)
    if outputs.shape[1] != 1:
        return temperature_scale(outputs, temperature, binary=False)
    positive = temperature_scale(outputs[:, 0], temperature, binary=True)
    proba = np.empty((len(positive), 2))
    proba[:, positive_index] = positive
    proba[:, 1 - positive_index] = 1.0 - positive
    return proba
