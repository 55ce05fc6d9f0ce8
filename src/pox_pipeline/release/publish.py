"""Publishing: everything that ships with a served model, built in one place.

``select`` (the pipeline's champion) and ``ensemble`` (a fold ensemble) call :func:`publish`;
nothing else writes into a stored model. A published model is the Keras model plus, beside it
in its BentoML folder: its TFLite conversions (``publish.backends``, each scored as
Keras is and published only when it agrees with Keras within ``publish.backend_check``), the
out-of-distribution guard (:data:`ood.OOD_FILE`), fitted through the serving path (same
extractor, same TTA) on the photos the model's evidence came from, and the model card
(Markdown + HTML) rendered from the metadata. The card and guard are also logged to the
model's MLflow run. What it reads of the config: :class:`settings.PublishConfig`.
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

from pox_pipeline.common import paths
from pox_pipeline.common.reporting import undefined
from pox_pipeline.common.temperature import IDENTITY_TEMPERATURE, class_probabilities
from pox_pipeline.data.prepare import load_split
from pox_pipeline.guard import ood
from pox_pipeline.models import forward
from pox_pipeline.models.inference import (
    NO_TTA,
    load_keras_model,
    mean_over_views,
    median_call_ms,
    store_keras_model,
    tta_views,
)
from pox_pipeline.release import reference
from pox_pipeline.release.settings import PublishConfig
from pox_pipeline.serving import model_card, monitor, tflite
from pox_pipeline.training import evaluate

if TYPE_CHECKING:
    import keras

HASH_LABEL = "content_sha256"
KERAS_MODULE = "bentoml.keras"  # the framework module of a model saved by bentoml.keras
# Metadata left out of the content hash: a new commit alone is no new model, nor a new timing
# of the same backends (each backend's ms_per_photo).
UNHASHED_METADATA = ("git_commit",)
UNHASHED_BACKEND_FIGURES = ("ms_per_photo",)
# Files saved with the model but derived from what is hashed: the card (from the metadata) and
# the monitoring reference (the guarded photos through serve.backend, whose `auto` choice
# follows the unhashed timings: the same content re-published keeps the choice measured first).
UNHASHED_FILES = (model_card.MARKDOWN_FILE, model_card.HTML_FILE, monitor.REFERENCE_FILE)


@dataclass(frozen=True)
class MemberPhotos:
    """One ensemble member's guard photos: those it trained on (the reference) and photos it
    never trained on (the threshold's), which ``source`` names (model inputs)."""

    trained_on: np.ndarray
    held_out: np.ndarray
    source: str


@dataclass(frozen=True)
class GuardPhotos:
    """The photos a guard (and the monitoring reference) is fitted on. Out of fold: ``images``
    are every non-test photo (the reference) and ``folds`` their patient-grouped folds (the
    threshold comes from each photo's distance to the other folds). Fixed split: ``images``
    are the reference (train) and ``held_out`` the photos that set the threshold (val).
    ``labels`` and ``held_out_labels`` are their class indices (backends are scored on them);
    ``oof_outputs`` each photo's raw output from the fold model that did not train on it.
    An ensemble's guard is fitted on ``members`` instead (one per member, in member order):
    the other photos then serve the backends and the monitoring reference only."""

    images: np.ndarray
    labels: np.ndarray
    folds: np.ndarray | None = None
    held_out: np.ndarray | None = None
    held_out_labels: np.ndarray | None = None
    oof_outputs: np.ndarray | None = None
    members: tuple[MemberPhotos, ...] = ()

    @classmethod
    def of_model(cls, data_cfg: DictConfig, model_name: str | None) -> GuardPhotos:
        """The photos the model's evidence came from: its out-of-fold predictions' photos and
        folds (``models/<name>/oof.csv``) when it was refitted, else train and val."""
        train, train_labels, train_files = load_split(data_cfg, "train")
        val, val_labels, val_files = load_split(data_cfg, "val")
        oof = paths.oof_file(data_cfg, model_name) if model_name else None
        if oof is None or not oof.is_file():
            return cls(train, train_labels, held_out=val, held_out_labels=val_labels)
        frame = pd.read_csv(oof)
        prepared = Path(data_cfg.paths.prepared_dir)
        expected = [str(Path(f).relative_to(prepared)) for f in [*train_files, *val_files]]
        if list(frame["file"]) != expected:
            raise ValueError(f"{oof} does not list the prepared train + val photos: re-run train")
        outputs = frame[[c for c in frame.columns if c.startswith("output_")]].to_numpy()
        return cls(np.concatenate([train, val]), np.concatenate([train_labels, val_labels]),
                   folds=frame["fold"].to_numpy(np.int64), oof_outputs=outputs)  # fmt: skip

    @property
    def evidence(self) -> tuple[np.ndarray, np.ndarray]:
        """The photos the selection evidence came from, with their labels: val on a fixed
        split; every non-test photo after a refit (the served model trained on them all)."""
        if self.held_out is None:
            return self.images, self.labels
        return self.held_out, self.held_out_labels

    @property
    def monitoring_photos(self) -> tuple[np.ndarray, np.ndarray]:
        """(the PCA basis's photos, the reference table's photos) of the monitoring reference:
        train and val on a fixed split; every non-test photo twice after a refit (the model's
        answers and guard scores in its table are then their out-of-fold ones:
        :meth:`held_out_scores`)."""
        held_out = self.images if self.held_out is None else self.held_out
        return self.images, held_out

    def fit(
        self, model: keras.Model, settings: ood.OODSettings, tta: str
    ) -> tuple[ood.GuardSet, np.ndarray | None]:
        """The guard, and after a refit each photo's out-of-fold guard ratios."""
        if self.members:
            photos = [(m.trained_on, m.held_out, m.source) for m in self.members]
            return ood.fit_member_guards(model, photos, settings, tta), None
        if self.folds is not None:
            return ood.fit_guard_out_of_fold(model, self.images, self.folds, settings, tta)
        return ood.fit_guard(model, self.images, self.held_out, settings, tta), None

    def held_out_scores(self, guard_ratios: np.ndarray | None) -> reference.HeldOutScores | None:
        """After a refit, the reference's out-of-fold answers (None on a fixed split, whose
        reference photos are held out from the model already)."""
        if self.oof_outputs is None:
            return None
        ratios = guard_ratios
        if ratios is None:  # no guard: no ratio in any space
            ratios = np.full((len(self.oof_outputs), len(forward.FEATURE_SPACES)), np.nan)
        return reference.HeldOutScores(self.oof_outputs, ratios)


def with_training_data(data_cfg: DictConfig, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """``metadata`` with the training data and split the model came from: what every
    published model ships with, and what the CLI says of a model not yet published."""
    return {**metadata, **model_card.training_data_metadata(data_cfg)}


def without_nulls(values: Mapping[str, Any]) -> dict[str, Any]:
    """BentoML metadata takes no None: undefined metrics are left out, in nested mappings too
    (a collection's test figures)."""
    return {k: without_nulls(v) if isinstance(v, Mapping) else v
            for k, v in values.items() if v is not None}  # fmt: skip


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
    if "backends" in hashed:
        hashed["backends"] = {
            name: {k: v for k, v in row.items() if k not in UNHASHED_BACKEND_FIGURES}
            for name, row in hashed["backends"].items()
        }
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


def finite(values: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics storable as metadata: an undefined one (None, NaN) is left out."""
    return {k: v for k, v in values.items() if not undefined(v)}


@dataclass(frozen=True)
class Scored:
    """One backend's answers on one set of photos, read as the service reads them."""

    scores: evaluate.SplitScores
    threshold: float | None

    @classmethod
    def of(
        cls, run: Any, images: np.ndarray, labels: np.ndarray, metadata: Mapping[str, Any],
        batch_size: int,
    ) -> Scored:  # fmt: skip
        """``run`` (Keras or TFLite: a batch -> {forward.OUTPUTS: ...}) over ``images``' TTA views,
        calibrated with the metadata's temperature."""
        tta = str(metadata.get("tta", NO_TTA))
        parts = []
        for start in range(0, len(images), batch_size):
            views = tta_views(images[start : start + batch_size], tta)
            parts.append(mean_over_views(run(np.concatenate(views))[forward.OUTPUTS], len(views)))
        outputs = np.concatenate(parts).astype(np.float64)
        positive = list(metadata["classes"]).index(metadata["positive_class"])
        proba = class_probabilities(
            outputs, float(metadata.get("temperature", IDENTITY_TEMPERATURE)), positive
        )
        scores = evaluate.SplitScores([], labels, proba, positive, binary=outputs.shape[1] == 1)
        return cls(scores, metadata.get("threshold"))

    def metrics(self, ece_bins: int) -> dict[str, Any]:
        return finite(evaluate.split_metrics(self.scores, self.threshold, ece_bins))

    def agreement(self, keras: Scored) -> dict[str, float]:
        """Label agreement with Keras at the threshold, and the largest probability change."""
        same = evaluate.predicted_indices(self.scores, self.threshold) == (
            evaluate.predicted_indices(keras.scores, keras.threshold)
        )
        return {"label_agreement": float(same.mean()),
                "max_abs_probability_difference":
                    float(np.abs(self.scores.proba - keras.scores.proba).max())}  # fmt: skip


@dataclass(frozen=True)
class BackendPhotos:
    """What converted backends are built with and scored on: ``representative``, training
    photos (model inputs), TFLite's representative dataset for the full-integer conversion's
    activation ranges; the selection evidence's photos and the test split, each (images,
    labels)."""

    representative: np.ndarray
    evidence: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]

    @classmethod
    def of(
        cls, data_cfg: DictConfig, photos: GuardPhotos, representative_photos: int
    ) -> BackendPhotos:
        test_images, test_labels, _ = load_split(data_cfg, "test")
        representative = tflite.representative_photos(photos.images, representative_photos)
        return cls(representative, photos.evidence, (test_images, test_labels))


def measure_backends(
    model: keras.Model,
    metadata: Mapping[str, Any],
    photos: BackendPhotos,
    config: PublishConfig,
    ece_bins: int,
    out_dir: Path,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Path]]:
    """Convert ``model`` to each of ``publish.backends``; score Keras and each
    conversion on the evidence and test photos (``evaluate``'s metrics at the metadata's
    threshold and temperature) and for speed. Returns metadata["backends"] (Keras first), the
    check's metadata and the files of the published backends (written under ``out_dir``)."""
    check = config.backend_check
    size = int(metadata["image_size"])
    threads, batch_sizes = config.tflite_threads, list(config.batch_sizes)
    settings = config.guard
    spaces = settings.spaces if config.image_statistics else (forward.HEAD,)
    statistics_size = settings.statistics_size if forward.IMAGE_STATISTICS in spaces else None
    sets = {"evidence": photos.evidence, "test": photos.test}
    one_photo = np.concatenate(
        tta_views(np.zeros((1, size, size, 3), np.float32), str(metadata.get("tta", NO_TTA)))
    )

    def measured(run: Any) -> tuple[dict[str, Scored], dict[str, Any]]:
        scored = {name: Scored.of(run, images, labels, metadata, check.batch_size)
                  for name, (images, labels) in sets.items() if len(images)}  # fmt: skip
        row = {name: s.metrics(ece_bins) for name, s in scored.items()}
        row["ms_per_photo"] = median_call_ms(run, one_photo, check.latency_repeats)
        return scored, row

    def answering(runner: tflite.Runner | None = None) -> Any:
        extractor = forward.feature_extractor(model, size, spaces, settings.statistics_size, runner)
        return extractor.answer

    keras_scored, keras_row = measured(answering())
    backends: dict[str, Any] = {tflite.KERAS: {"published": True, **keras_row}}
    files = {}
    for backend in config.backends:
        try:
            flatbuffer = tflite.converted(model, size, backend, photos.representative,
                                          statistics_size)  # fmt: skip
        except ValueError as err:  # an op TFLite lacks: recorded, not published
            backends[backend] = {"published": False, "error": str(err)}
            continue
        try:
            scored, row = measured(answering(tflite.Runner(flatbuffer, threads, batch_sizes)))
        except RuntimeError as err:  # converted, but the interpreter cannot run it
            backends[backend] = {"published": False, "error": f"fails when run: {err}"}
            continue
        agreement = scored["evidence"].agreement(keras_scored["evidence"])
        passed = check.passes(
            agreement["label_agreement"], agreement["max_abs_probability_difference"]
        )
        backends[backend] = {"file": tflite.file_name(backend), "size_bytes": len(flatbuffer),
                             "published": passed, **agreement, **row}  # fmt: skip
        if passed:
            files[tflite.file_name(backend)] = Path(out_dir) / tflite.file_name(backend)
            files[tflite.file_name(backend)].write_bytes(flatbuffer)
    check_metadata = {
        "min_label_agreement": check.min_label_agreement,
        "max_probability_difference": check.max_probability_difference,
        "representative_photos": len(photos.representative),
        "evidence_photos": len(photos.evidence[0]),
        "test_photos": len(photos.test[0]),
    }
    return backends, check_metadata, files


@dataclass(frozen=True)
class Release:
    """Everything one publish ships, decided before it starts (by ``select`` or ``ensemble``):
    the model file; its decision policy and evidence (``metadata``: classes, threshold,
    temperature, TTA, metrics, provenance); the photos its guard, backends and monitoring
    reference are fitted on; the data configuration they came from (its MANIFEST is quoted
    on the card); and the MLflow run the served files are logged to."""

    model_file: Path
    metadata: Mapping[str, Any]
    run_id: str
    photos: GuardPhotos
    data_cfg: DictConfig


def publish(cfg: DictConfig, release: Release) -> str:
    """Build the served bundle in one pass and store it: convert the model to
    ``publish.backends`` and measure them (the full-integer one's activation ranges set on the
    release's training photos), fit the out-of-distribution guard (``publish.guard``), write the
    monitoring reference and the model card, save them all to BentoML and log them to the
    release's MLflow run. Returns the BentoML tag. Never reads what the caller chose from."""
    config = PublishConfig.from_cfg(cfg)
    model_file, run_id, photos, data_cfg = (
        release.model_file, release.run_id, release.photos, release.data_cfg
    )
    metadata = with_training_data(data_cfg, release.metadata)
    model = load_keras_model(model_file)
    with tempfile.TemporaryDirectory() as tmp:
        backend_photos = BackendPhotos.of(
            data_cfg, photos, config.backend_check.representative_photos
        )
        metadata["backends"], metadata["backend_check"], extra_files = measure_backends(
            model, metadata, backend_photos, config, int(cfg.evaluate.ece_bins), Path(tmp)
        )
        guard_ratios = None
        if config.fit_guard:
            guard, guard_ratios = photos.fit(model, config.guard,
                                             str(metadata.get("tta", NO_TTA)))  # fmt: skip
            metadata["ood"] = guard.metadata()
            extra_files[ood.OOD_FILE] = guard.save(Path(tmp) / ood.OOD_FILE)
        if config.monitored:  # the reference `pox monitor` compares uploads with
            basis_photos, reference_photos = photos.monitoring_photos
            files, metadata["monitoring"] = reference.write_reference(
                model_file, metadata, basis_photos, reference_photos, config, Path(tmp),
                extra_files, photos.held_out_scores(guard_ratios),
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


