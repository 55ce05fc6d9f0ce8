"""The monitoring reference stored with a model at publish: the PCA basis of the training
photos' head features, and the same record columns the service writes, for the photos the
model's evidence came from, computed through the served path. ``pox monitor``
(:mod:`pox_pipeline.ops.drift`) tests the served records against it."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pox_pipeline.common import paths
from pox_pipeline.guard import ood
from pox_pipeline.models import forward
from pox_pipeline.release.settings import PublishConfig
from pox_pipeline.serving.monitor import BASIS_FILE, REFERENCE_FILE, Basis, records, split_columns


@dataclasses.dataclass(frozen=True)
class HeldOutScores:
    """The reference's model answers when the served model trained on every reference photo
    (a refit): its own answers there are in-sample (surer than on any upload, and each photo
    sits in the guard's reference, so its guard distance is too small), and `pox monitor`
    would call genuine new photos drift. ``outputs`` (N, C) are each photo's raw outputs from
    the fold model that did not train on it, ``guard_ratios`` (N, spaces) its out-of-fold
    distance / threshold per guard space (``ood.GuardSet.out_of_fold_ratios``)."""

    outputs: np.ndarray
    guard_ratios: np.ndarray

    def replace_in(self, scored: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(outputs with the OOD score, monitored columns) of the served path, with the
        model's outputs, the guard ratios and the OOD score (their largest) held out."""
        ratios = np.asarray(self.guard_ratios, np.float64)
        score = ood.score_of(ratios)
        columns = columns.copy()
        columns[:, : ratios.shape[1]] = ratios
        return np.concatenate([np.asarray(self.outputs, np.float64), score[:, None]], 1), columns


def write_reference(
    model_file: Path,
    metadata: Mapping[str, Any],
    train: np.ndarray,
    val: np.ndarray,
    config: PublishConfig,
    out_dir: Path,
    served_files: Mapping[str, Path],
    held_out: HeldOutScores | None = None,
) -> tuple[dict[str, Path], dict[str, Any]]:
    """The PCA basis (training photos' head features) and the reference table (the validation
    photos through the served path: ``serve.backend``'s stored conversion, the model's TTA,
    its guard if one was fitted; ``served_files``, name -> file, are what is stored beside the
    model) in ``out_dir``; returns name -> file, to store beside the model, and the metadata
    entry.
    ``held_out``: the model's answers on ``val`` out of fold, when it trained on them."""
    import shutil

    from pox_pipeline.models.inference import NO_TTA, load_keras_model
    from pox_pipeline.serving.policy import DecisionPolicy
    from pox_pipeline.serving.scoring import Predictor, split_ood_score

    # Only the settings that shape the reference (PublishConfig), so that a serving-only knob
    # (port, workers, upload limits) leaves select's DVC params, and the published model, as
    # they are.
    guard = config.guard
    head_only = dataclasses.replace(guard, spaces=(forward.HEAD,))
    head = ood.features_of(load_keras_model(model_file), np.asarray(train, np.float32),
                           head_only, str(metadata.get("tta", NO_TTA)))[forward.HEAD]  # fmt: skip
    basis = Basis.fit(head, config.monitoring_components)
    basis_file = basis.save(Path(out_dir) / BASIS_FILE)
    policy = DecisionPolicy.from_metadata(str(metadata.get("registered_model_name", "model")),
                                   "reference", metadata)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:  # a model directory as the service reads it
        shutil.copyfile(model_file, Path(tmp) / paths.MODEL_FILE)
        shutil.copyfile(basis_file, Path(tmp) / BASIS_FILE)
        for name, path in served_files.items():
            shutil.copyfile(path, Path(tmp) / name)
        predictor = Predictor(  # the guard if served_files hold one
            Path(tmp), policy, config.served_backend, config.tflite_threads, ood_enabled=True,
            monitoring=True, batch_sizes=config.batch_sizes,
        )  # fmt: skip
        size = guard.batch_size
        parts = [predictor.outputs_with_monitoring(val[start : start + size])
                 for start in range(0, len(val), size)]  # fmt: skip
    scored, columns = split_columns(np.concatenate(parts), len(basis.columns))
    if held_out is not None:
        scored, columns = held_out.replace_in(scored, columns)
    answers = policy.results(*split_ood_score(scored))
    table = records(answers, columns, basis.columns, policy.positive_class)
    reference_file = Path(out_dir) / REFERENCE_FILE
    frame = pd.DataFrame(table).drop(columns=["model_version"])
    frame.to_csv(reference_file, index=False)
    files = {BASIS_FILE: basis_file, REFERENCE_FILE: reference_file}
    return files, {"columns": list(basis.columns), "components": len(basis.components),
                   "reference_photos": len(frame),
                   "reference_answers": "out_of_fold" if held_out else "held_out"}  # fmt: skip
