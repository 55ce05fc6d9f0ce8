"""Publishing: everything that ships with a served model, built in one place.

``select`` (the pipeline's champion) and ``ensemble`` (a fold ensemble) call :func:`publish`;
nothing else writes into a stored model. A published model is the Keras model plus, beside it
in its BentoML folder: the out-of-distribution guard (:data:`ood.OOD_FILE`), fitted through
the serving path (same extractor, same TTA) on the photos the model's evidence came from, and
the model card (Markdown + HTML) rendered from the metadata. The card and guard are also
logged to the model's MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bentoml
import numpy as np
import pandas as pd
from bentoml.exceptions import NotFound
from mlflow import MlflowClient
from omegaconf import DictConfig

from pox_pipeline import drift, model_card, ood, paths
from pox_pipeline.data import load_split
from pox_pipeline.inference import NO_TTA, load_keras_model, store_keras_model

if TYPE_CHECKING:
    import keras

HASH_LABEL = "content_sha256"
KERAS_MODULE = "bentoml.keras"  # the framework module of a model saved by bentoml.keras
# Metadata left out of the content hash: a new commit alone is no new model.
UNHASHED_METADATA = ("git_commit",)
# Files saved with the model but rendered from its metadata: hashed through the metadata.
UNHASHED_FILES = (model_card.MARKDOWN_FILE, model_card.HTML_FILE)


@dataclass(frozen=True)
class GuardPhotos:
    """The photos a guard (and the monitoring reference) is fitted on. Out of fold: ``images``
    are every non-test photo (the reference) and ``folds`` their patient-grouped folds (the
    threshold comes from each photo's distance to the other folds). Fixed split: ``images``
    are the reference (train) and ``held_out`` the photos that set the threshold (val)."""

    images: np.ndarray
    folds: np.ndarray | None = None
    held_out: np.ndarray | None = None

    @classmethod
    def of_model(cls, data_cfg: DictConfig, model_name: str | None) -> GuardPhotos:
        """The photos the model's evidence came from: its out-of-fold predictions' photos and
        folds (``models/<name>/oof.csv``) when it was refitted, else train and val."""
        train, _, train_files = load_split(data_cfg, "train")
        val, _, val_files = load_split(data_cfg, "val")
        oof = paths.oof_file(data_cfg, model_name) if model_name else None
        if oof is None or not oof.is_file():
            return cls(train, held_out=val)
        frame = pd.read_csv(oof)
        prepared = Path(data_cfg.paths.prepared_dir)
        expected = [str(Path(f).relative_to(prepared)) for f in [*train_files, *val_files]]
        if list(frame["file"]) != expected:
            raise ValueError(f"{oof} does not list the prepared train + val photos: re-run train")
        return cls(np.concatenate([train, val]), folds=frame["fold"].to_numpy(np.int64))

    @property
    def monitoring_photos(self) -> tuple[np.ndarray, np.ndarray]:
        """(the PCA basis's photos, the reference table's photos) of the monitoring reference:
        train and val on a fixed split; every non-test photo twice after a refit (no photo is
        held out from the served model then, so its reference is in-sample)."""
        held_out = self.images if self.held_out is None else self.held_out
        return self.images, held_out

    def fit(self, model: keras.Model, settings: ood.OODSettings, tta: str) -> ood.GuardSet:
        if self.folds is not None:
            return ood.fit_guard_out_of_fold(model, self.images, self.folds, settings, tta)
        return ood.fit_guard(model, self.images, self.held_out, settings, tta)


def without_nulls(values: Mapping[str, Any]) -> dict[str, Any]:
    """BentoML metadata takes no None: undefined metrics are left out."""
    return {k: v for k, v in values.items() if v is not None}


def content_hash(
    model_file: Path, metadata: Mapping[str, Any], extra_files: Mapping[str, Path] | None = None
) -> str:
    """sha256 over the model bytes, the files saved with it and the metadata that changes
    what is served."""
    digest = hashlib.sha256(model_file.read_bytes())
    for name, path in sorted((extra_files or {}).items()):
        if name not in UNHASHED_FILES:
            digest.update(name.encode() + path.read_bytes())
    hashed = {k: v for k, v in metadata.items() if k not in UNHASHED_METADATA}
    digest.update(json.dumps(hashed, sort_keys=True).encode())
    return digest.hexdigest()


def save_bentoml_model(
    cfg: DictConfig,
    model_file: Path,
    metadata: Mapping[str, Any],
    extra_files: Mapping[str, Path] | None = None,
    model: keras.Model | None = None,
) -> str:
    """Save the champion (and ``extra_files``, name -> file, beside it) to the BentoML store;
    reuse the latest if its content is identical. ``model`` is ``model_file`` already loaded.

    Only the latest counts: after A, B, A the store gets a new A, because serving loads
    ``<name>:latest``. Saved by ``bentoml.keras``, so ``bentoml.keras.load_model`` loads it.
    """
    name = cfg.select.bentoml_model_name
    sha = content_hash(model_file, metadata, extra_files)
    try:
        latest = bentoml.models.get(f"{name}:latest")
        if latest.info.labels.get(HASH_LABEL) == sha and latest.info.module == KERAS_MODULE:
            return str(latest.tag)
    except NotFound:
        pass
    labels = {HASH_LABEL: sha, "model_name": str(metadata["model_name"])}
    if model is None:
        model = load_keras_model(model_file)
    return str(store_keras_model(name, model, labels, dict(metadata), extra_files).tag)


def publish(
    cfg: DictConfig,
    data_cfg: DictConfig,
    model_file: Path,
    metadata: Mapping[str, Any],
    run_id: str,
    guard_photos: GuardPhotos | None = None,
) -> str:
    """Serve a model: fit its out-of-distribution guard (``serve.ood``) on ``guard_photos``
    (default: ``data_cfg``'s train and val), write its model card, save all three to BentoML
    and log the card and guard to its MLflow run. The one publish step of select and ensemble."""
    metadata = {**metadata, **model_card.training_data_metadata(data_cfg)}
    model = load_keras_model(model_file)
    with tempfile.TemporaryDirectory() as tmp:
        extra_files = {}
        photos = guard_photos or GuardPhotos.of_model(data_cfg, None)
        if cfg.serve.ood.enabled:
            settings = ood.OODSettings.from_cfg(cfg.serve.ood)
            guard = photos.fit(model, settings, str(metadata.get("tta", NO_TTA)))
            metadata["ood"] = guard.metadata()
            extra_files[ood.OOD_FILE] = guard.save(Path(tmp) / ood.OOD_FILE)
        if cfg.serve.monitoring.enabled:  # the reference `pox monitor` compares uploads with
            basis_photos, reference_photos = photos.monitoring_photos
            files, metadata["monitoring"] = drift.write_reference(
                model_file, metadata, basis_photos, reference_photos, cfg.serve, Path(tmp),
                extra_files.get(ood.OOD_FILE),
            )  # fmt: skip
            extra_files.update(files)
        metadata = without_nulls(metadata)
        name = cfg.select.registered_model_name
        for path in model_card.write_files(Path(tmp), name, metadata, str(cfg.serve.ui_path)):
            extra_files[path.name] = path
        tag = save_bentoml_model(cfg, model_file, metadata, extra_files, model)
        client = MlflowClient()
        for path in extra_files.values():
            client.log_artifact(run_id, str(path))
    return tag


