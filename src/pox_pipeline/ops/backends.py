"""How far a converted backend drifts from Keras on a folder of photos (``pox doctor`` and
benchmarks/backends.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pox_pipeline.common import preprocess
from pox_pipeline.serving.policy import DecisionPolicy
from pox_pipeline.serving.scoring import Predictor

if TYPE_CHECKING:
    from bentoml import Model as StoredModel


# ---------------------------------------------------------------------------- TFLite check


def folder_inputs(
    folder: Path, policy: DecisionPolicy, extensions: Sequence[str] = preprocess.PHOTO_SUFFIXES
) -> tuple[np.ndarray, list[Path]]:
    """Model inputs of the photos under ``folder`` (any depth, in path order), and their files."""
    files = preprocess.photo_files(folder, extensions)
    if not files:
        raise FileNotFoundError(f"no images under {folder}")
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
