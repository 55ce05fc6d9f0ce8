"""The ``train@<name>`` stage: one training loop for every model in ``conf/model/``.

Reads the prepared train/val splits, fits the model with class weights and early stopping
(restoring the best epoch's weights), and writes ``models/<name>/model.keras`` + ``run.json`` and
``reports/train/<name>/{history.csv,curves.png}``, all tracked in one MLflow run.

When the model begins with frozen layers (VGG16's frozen base), their outputs are computed
once per image and only the trainable rest is fitted on that cache: the frozen forward pass
is then paid once instead of every epoch. The saved model is still the whole model.

A model that fine-tunes the top of a pretrained backbone (``finetune.blocks``) is fitted in two
phases of the same loop: the head with the backbone frozen, then the top blocks too, at the
lower ``finetune.learning_rate``; the second phase is kept only if it improves the monitor.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf
from keras.src.backend.tensorflow import trainer as _keras_tf_trainer
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from sklearn.utils.class_weight import compute_class_weight
from tqdm import tqdm

from pox_pipeline.common import paths
from pox_pipeline.common.config import stage_entry
from pox_pipeline.data.prepare import group_folds, load_split, split_groups_of
from pox_pipeline.models.architectures import (
    FrozenSplit,
    WeightsUnavailableError,
    build_model,
    compile_model,
    frozen_split,
    set_fine_tuning,
    weights_source,
)
from pox_pipeline.models.inference import model_outputs
from pox_pipeline.training import tracking

log = logging.getLogger(__name__)

EPOCH_METRICS = ["loss", "accuracy", "val_loss", "val_accuracy"]  # every model logs these
HISTORY_COLUMNS = ["epoch", *EPOCH_METRICS]
# Monitors where higher is better (Keras' EarlyStopping "auto" mode reads names the same way).
HIGHER_IS_BETTER = ("accuracy", "auc", "precision", "recall")
FLOAT16_MAX = float(np.finfo(np.float16).max)
_keras_reduce_per_replica = _keras_tf_trainer.reduce_per_replica


# ---------------------------------------------------------------------------- set-up


def make_strategy(name: str) -> tf.distribute.Strategy:
    """``default`` | ``mirrored`` (all local devices; the CPU when there is no GPU) |
    ``multi_worker`` (workers from ``TF_CONFIG``; must exist before any other TF op)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"train.strategy must be default, mirrored or multi_worker, got {name!r}")


def _multi_worker_mean(values: Any, strategy: tf.distribute.Strategy, reduction: str) -> Any:
    """Keras' per-step reduction, with multi-worker means taken over workers (``axis=None``):
    Keras 3.15 passes ``axis=0``, which fails on the scalar loss and metrics."""
    if reduction in ("auto", "mean") and _keras_tf_trainer._collective_all_reduce_multi_worker(
        strategy
    ):
        return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
    return _keras_reduce_per_replica(values, strategy, reduction)


@contextmanager
def multi_worker_fit(model: keras.Model, strategy: tf.distribute.Strategy) -> Iterator[None]:
    """While inside, ``model.fit`` runs under MultiWorkerMirroredStrategy with several workers.

    Keras 3.15 fails there (keras-team/keras#20585): its symbolic pre-build reduces the first
    (nested) batch across workers, which the collective strategy cannot do, and its step
    reduction passes a bad axis. Two narrow shims, only for this strategy: the model defers
    its build to the traced step (fit then runs inside ``strategy.scope()``), and the step
    reduction above replaces Keras' for multi-worker means, until the block ends.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        yield
        return
    model._distribute_strategy = None  # fit picks the strategy up from the scope instead
    _keras_tf_trainer.reduce_per_replica = _multi_worker_mean
    try:
        yield
    finally:
        _keras_tf_trainer.reduce_per_replica = _keras_reduce_per_replica


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Only the chief writes files and tracks to MLflow; single-process runs are always chief."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def seed_everything(cfg: DictConfig) -> None:
    """Same seed, same run: Python/NumPy/TF seeds, plus deterministic kernels if asked."""
    keras.utils.set_random_seed(cfg.seed)
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """scikit-learn's "balanced" weights, n / (k * n_c): every present class weighs the same."""
    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    return {int(c): float(w) for c, w in zip(present, weights, strict=True)}


def sample_weights(labels: np.ndarray, weights: dict[int, float] | None) -> np.ndarray | None:
    return None if weights is None else np.array([weights[int(y)] for y in labels], np.float32)


def label_array(labels: np.ndarray, num_classes: int, positive_index: int) -> np.ndarray:
    """Binary targets are 1.0 for ``data.positive_class`` (the sigmoid unit is P(positive), as
    evaluation and serving read it), else 0.0; multi-class ones stay class indices."""
    if num_classes == 2:
        return (labels == positive_index).astype(np.float32)
    return labels.astype(np.int64)


def _with_options(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Shard by element across workers (in-memory data has no files to shard by)."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def image_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray | None,
    batch_size: int,
    shuffle_seed: int | None = None,
) -> tf.data.Dataset:
    """Decoded images (already in memory) -> (x, y[, w]) batches; shuffled when seeded."""
    tensors = (images, labels) if weights is None else (images, labels, weights)
    dataset = tf.data.Dataset.from_tensor_slices(tensors)
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(images), seed=shuffle_seed, reshuffle_each_iteration=True)
    return _with_options(dataset.batch(batch_size))


def mixup(
    dataset: tf.data.Dataset, alpha: float, num_classes: int, seed: int
) -> tf.data.Dataset:
    """Mixup (Zhang et al. 2018) on (x, y[, w]) batches: each example is blended with another
    of its batch, ``lam * a + (1 - lam) * b`` for inputs, targets and sample weights, with
    ``lam ~ Beta(alpha, alpha)`` per example; seeded, so a run repeats exactly. Binary
    (float) targets only: sparse multi-class labels cannot be mixed."""
    if num_classes != 2:
        raise ValueError("mixup is implemented for the binary (sigmoid) head only")

    def blend(seeds: tf.Tensor, batch: tuple[tf.Tensor, ...]) -> tuple[tf.Tensor, ...]:
        n = tf.shape(batch[0])[0]
        seed_a, seed_b, seed_p = tf.unstack(tf.reshape(seeds, (3, 2)))
        gamma_a = tf.random.stateless_gamma([n], seed_a, alpha)
        gamma_b = tf.random.stateless_gamma([n], seed_b, alpha)
        lam = gamma_a / (gamma_a + gamma_b)
        order = tf.argsort(tf.random.stateless_uniform([n], seed_p))

        def mix(t: tf.Tensor) -> tf.Tensor:
            weight = tf.reshape(tf.cast(lam, t.dtype), [-1] + [1] * (len(t.shape) - 1))
            return weight * t + (1 - weight) * tf.gather(t, order)

        return tuple(mix(t) for t in batch)

    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(6)
    return tf.data.Dataset.zip(seeds, dataset).map(lambda s, b: blend(s, b))


# ---------------------------------------------------------------------------- embedding cache


@dataclass
class EmbeddingCache:
    """Frozen-prefix outputs: ``train`` is (views, n, ...), ``val`` is (1, n, ...)."""

    train: np.ndarray
    val: np.ndarray
    # "memory" (float32 arrays) or "disk" (float16 memmaps); run.json's embedding_cache also
    # says "disabled" (train.embedding_cache.enabled: false) or "nothing_frozen" (no prefix).
    mode: str
    build_seconds: float


def embedding_cache_bytes(split: FrozenSplit, n_images: int) -> int:
    """Size of ``n_images`` frozen outputs as float32."""
    return n_images * math.prod(split.frozen.output_shape[1:]) * np.dtype(np.float32).itemsize


def build_embedding_cache(
    split: FrozenSplit,
    train_images: np.ndarray,
    val_images: np.ndarray,
    views: int,
    batch_size: int,
    max_memory_mb: float,
    directory: Path,
) -> EmbeddingCache:
    """Run the frozen prefix once per image (``views`` augmented copies of each training image
    when the model augments); float32 in memory, or float16 memmaps in ``directory`` when the
    float32 cache would exceed ``max_memory_mb``."""
    started = time.perf_counter()
    augment = split.augmentation is not None
    views = views if augment else 1
    total = embedding_cache_bytes(split, views * len(train_images) + len(val_images))
    on_disk = total > max_memory_mb * 2**20
    shape = split.frozen.output_shape[1:]

    def allocate(name: str, n_views: int, n: int) -> np.ndarray:
        if not on_disk:
            return np.empty((n_views, n, *shape), np.float32)
        directory.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(
            directory / f"{name}.npy", mode="w+", dtype=np.float16, shape=(n_views, n, *shape)
        )

    @tf.function(reduce_retracing=True)
    def extract(batch: tf.Tensor, training_augmentation: bool) -> tf.Tensor:
        if training_augmentation:
            batch = split.augmentation(batch, training=True)
        return split.frozen(batch, training=False)

    def fill(out: np.ndarray, images: np.ndarray, augmented: bool, progress: tqdm) -> None:
        for view in range(out.shape[0]):
            for start in range(0, len(images), batch_size):
                features = extract(images[start : start + batch_size], augmented).numpy()
                if on_disk:
                    features = np.clip(features, -FLOAT16_MAX, FLOAT16_MAX)
                out[view, start : start + len(features)] = features
                progress.update(len(features))

    train = allocate("train", views, len(train_images))
    val = allocate("val", 1, len(val_images))
    total_images = views * len(train_images) + len(val_images)
    with tqdm(total=total_images, desc="embedding cache", unit="img", disable=None) as progress:
        fill(train, train_images, augment, progress)
        fill(val, val_images, False, progress)
    mode = "disk" if on_disk else "memory"
    seconds = time.perf_counter() - started
    log.info(
        "embedding cache: %s, %d train x %d view(s) + %d val of shape %s (%.1f MB as float32), "
        "built in %.1f s%s",
        mode, len(train_images), views, len(val_images), tuple(shape), total / 2**20, seconds,
        f" under {directory}" if on_disk else "",
    )  # fmt: skip
    return EmbeddingCache(train, val, mode, seconds)


def cached_dataset(
    features: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray | None,
    batch_size: int,
    shuffle_seed: int | None = None,
) -> tf.data.Dataset:
    """(x, y[, w]) batches from a (views, n, ...) cache; each epoch takes one random view per
    image, so an epoch has as many steps as without the cache. Works on arrays and memmaps."""
    views, n = features.shape[:2]
    feature_shape = features.shape[2:]

    def gather(view: np.ndarray, index: np.ndarray) -> np.ndarray:
        return np.asarray(features[view, index], dtype=np.float32)

    indices = tf.data.Dataset.range(n)
    if shuffle_seed is not None:
        indices = indices.shuffle(n, seed=shuffle_seed, reshuffle_each_iteration=True)
    if views > 1:
        chosen = tf.data.Dataset.random(seed=shuffle_seed, rerandomize_each_iteration=True)
        chosen = chosen.map(lambda r: tf.math.floormod(r, views))
    else:
        chosen = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).repeat()
    label_tensor = tf.constant(labels)
    weight_tensor = None if weights is None else tf.constant(weights)

    def load(view: tf.Tensor, index: tf.Tensor) -> tuple[tf.Tensor, ...]:
        x = tf.numpy_function(gather, [view, index], tf.float32, stateful=False)
        x = tf.ensure_shape(x, (None, *feature_shape))
        y = tf.gather(label_tensor, index)
        return (x, y) if weight_tensor is None else (x, y, tf.gather(weight_tensor, index))

    dataset = tf.data.Dataset.zip(chosen, indices).batch(batch_size).map(load)
    return _with_options(dataset)


# ---------------------------------------------------------------------------- outputs


def history_frame(history: dict[str, list[float]]) -> pd.DataFrame:
    """Keras history -> epoch (from 1), loss, accuracy, val_loss, val_accuracy, then any other
    metric the model logged (auc, val_auc, learning_rate)."""
    extra = sorted(key for key in history if key not in EPOCH_METRICS)
    length = len(history["loss"])
    frame = pd.DataFrame({key: history.get(key, [np.nan] * length)  # no val_ in a refit
                          for key in [*EPOCH_METRICS, *extra]})  # fmt: skip
    frame.insert(0, "epoch", np.arange(1, len(frame) + 1))
    return frame


@dataclass(frozen=True)
class Phase:
    """One fit of the training loop: ``cfg`` is the model config with this phase's learning
    rate, epochs and patience; ``tune`` opens the backbone's ``tuned`` top for training."""

    name: str
    cfg: DictConfig
    tune: bool
    batchnorm: str = "frozen"  # finetune.batchnorm, for a phase that tunes


def training_phases(model_cfg: DictConfig) -> list[Phase]:
    """One phase, or head-then-fine-tune for a model with ``finetune.blocks`` > 0."""
    finetune = model_cfg.get("finetune")
    if not finetune or not finetune.blocks:
        return [Phase("train", model_cfg, tune=False)]
    tuned_cfg = OmegaConf.merge(
        model_cfg,
        {"learning_rate": finetune.learning_rate, "epochs": finetune.epochs,
         "patience": finetune.patience},
    )  # fmt: skip
    return [
        Phase("head", model_cfg, tune=False),
        Phase("finetune", tuned_cfg, tune=True, batchnorm=finetune.batchnorm),
    ]


def improves(monitor: str, value: float, reference: float) -> bool:
    """Whether ``value`` of the monitored metric beats ``reference``."""
    higher = any(name in monitor for name in HIGHER_IS_BETTER) and "loss" not in monitor
    return value > reference if higher else value < reference


def plot_curves(frame: pd.DataFrame, path: Path, title: str) -> Path:
    """Loss and accuracy, train vs validation, side by side (as the tutorial plotted them)."""
    figure = Figure(figsize=(10, 4))
    for axis, metric in zip(figure.subplots(1, 2), ("loss", "accuracy"), strict=True):
        axis.plot(frame["epoch"], frame[metric], marker="o", label=f"train {metric}")
        if frame[f"val_{metric}"].notna().any():  # a refit has no held-out images
            axis.plot(frame["epoch"], frame[f"val_{metric}"], marker="o", label=f"val {metric}")
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.set_title(metric)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def inference_copy(model: keras.Model) -> keras.Model:
    """An uncompiled copy holding the trained weights: what evaluation and serving load,
    without optimizer state (under half the file for VGG16). Rebuilt from the model's own
    config, as ``keras.models.clone_model`` does, minus its recompiling."""
    copy = type(model).from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def model_summary(model: keras.Model) -> str:
    lines: list[str] = []
    model.summary(print_fn=lambda text, line_break=True: lines.append(text), expand_nested=True)
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the stage


@dataclass
class Pool:
    """Every image one ``train`` run may fit on, and how a subset of it becomes a dataset.

    ``fit_inputs`` are what the fitted model sees in training (the images, or their
    augmented frozen outputs, views first), ``plain_inputs`` what it sees for early stopping
    (no augmentation). One cache serves every fold and the refit: the frozen prefix runs once.
    """

    images: np.ndarray
    labels: np.ndarray
    files: list[str]
    fit_inputs: np.ndarray
    plain_inputs: np.ndarray
    cached: bool


def fold_plan(cfg: DictConfig, pool: Pool, groups: list[str]) -> np.ndarray:
    """Each pooled image's fold for ``train.refit.folds`` patient-grouped folds (split by
    ``data.split_seed``, so every model of a run sees the same folds)."""
    return group_folds(groups, pool.labels, int(cfg.train.refit.folds), int(cfg.data.split_seed))


def refit_epochs(fold_phases: list[list[dict[str, Any]]]) -> dict[str, int]:
    """Epochs of each phase for the refit: the median best epoch over the folds; a phase the
    folds mostly did not keep (fine-tuning that did not help) gets 0."""
    epochs: dict[str, int] = {}
    for name in [record["phase"] for record in fold_phases[0]]:
        records = [r for phases in fold_phases for r in phases if r["phase"] == name]
        kept = [r for r in records if r["kept"]]
        epochs[name] = (
            int(np.ceil(np.median([r["phase_best_epoch"] for r in kept])))
            if 2 * len(kept) > len(records)
            else 0
        )
    return epochs


def refit_folds(cfg: DictConfig) -> int:
    """``train.refit.folds``: 0 (one fixed split) or at least 3."""
    folds = int(cfg.train.refit.folds)
    if folds in (1, 2):
        raise ValueError(
            f"train.refit.folds={folds}: use 0 (one fixed split) or at least 3 (each fold's "
            "model trains on the other folds but the one it early-stops on, which fewer folds "
            "leave empty)"
        )
    return folds


def non_test_photos(cfg: DictConfig) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """Every photo a train run may fit on, train then val: images, labels, files, and how many
    of them are train."""
    loaded = [load_split(cfg, name) for name in ("train", "val")]
    images = np.concatenate([part[0] for part in loaded])
    labels = np.concatenate([part[1] for part in loaded])
    files = [file for part in loaded for file in part[2]]
    return images, labels, files, len(loaded[0][0])


def pooled(
    cfg: DictConfig,
    split: FrozenSplit | None,
    images: np.ndarray,
    labels: np.ndarray,
    files: list[str],
    scratch: Path,
) -> tuple[Pool, str, float]:
    """The pool of these photos, through the embedding cache when the model has a frozen
    ``split``; with the cache's mode and build seconds, which run.json and MLflow record."""
    if split is None:
        mode = "nothing_frozen" if cfg.train.embedding_cache.enabled else "disabled"
        return Pool(images, labels, files, images, images, cached=False), mode, 0.0
    model_cfg = cfg.model[cfg.model_name]
    cache = build_embedding_cache(
        split,
        images,
        images,
        views=model_cfg.augment.cached_copies,
        batch_size=model_cfg.batch_size,
        max_memory_mb=cfg.train.embedding_cache.max_memory_mb,
        directory=scratch,
    )
    pool = Pool(images, labels, files, cache.train, cache.val, cached=True)
    return pool, cache.mode, cache.build_seconds


@dataclass(frozen=True)
class Fitted:
    """What a train run fitted: the served model's phases and history; under k-fold also the
    out-of-fold outputs, each photo's fold and the folds' record."""

    phases: list[dict[str, Any]]
    frame: pd.DataFrame
    oof_outputs: np.ndarray | None = None
    fold_of: np.ndarray | None = None
    cross_validation: dict[str, Any] | None = None


Fit = Callable[..., tuple[list[dict[str, Any]], pd.DataFrame]]


def cross_validated_fit(
    cfg: DictConfig, model: keras.Model, pool: Pool, fit: Fit, folds: int, track: bool
) -> Fitted:
    """Each fold's model fitted on the other folds but the next, early-stopped on that one,
    predicting its own fold (out-of-fold outputs); then the refit on every photo for the folds'
    median epochs. ``track``: each fold as a nested MLflow run, the refit's epochs logged."""
    model_name = cfg.model_name
    fold_of = fold_plan(cfg, pool, [*split_groups_of(cfg, "train"),
                                    *split_groups_of(cfg, "val")])  # fmt: skip
    oof_outputs = np.zeros((len(pool.images), int(model.output_shape[-1])))
    fold_phases: list[list[dict[str, Any]]] = []
    for fold in tqdm(range(folds), desc=f"{model_name} folds", unit="fold", disable=None):
        stop = (fold + 1) % folds  # early stopping on the next fold, never the held-out one
        phases_k, _ = fit(
            np.flatnonzero((fold_of != fold) & (fold_of != stop)),
            np.flatnonzero(fold_of == stop),
        )
        held_out = np.flatnonzero(fold_of == fold)
        oof_outputs[held_out] = model_outputs(
            model, pool.images[held_out], int(cfg.evaluate.batch_size), str(cfg.evaluate.tta)
        )
        fold_phases.append(phases_k)
        log.info("%s fold %d/%d: %s", model_name, fold + 1, folds, phases_k)
        if track:
            log_fold(model_name, fold, phases_k, len(held_out))
    epochs = refit_epochs(fold_phases)
    phases, frame = fit(np.arange(len(pool.images)), None, epochs, track=track)
    record = {"folds": folds, "fold_phases": fold_phases, "refit_epochs": epochs,
              "images": len(pool.images)}  # fmt: skip
    return Fitted(phases, frame, oof_outputs, fold_of, record)


def train(
    cfg: DictConfig, model_name: str, parent_run_id: str | None = None
) -> dict[str, Any]:
    """Train ``cfg.model[model_name]``; returns what run.json records.

    ``train.refit.folds`` >= 3 (the default 5): patient-grouped k-fold over all non-test photos
    (train + val). Each fold's model is fitted on the other folds but one, early-stopped on
    that one, and predicts its own fold: out-of-fold predictions for every photo, which
    ``evaluate`` calibrates and thresholds on and ``select`` compares on. The served model is
    then refitted on every non-test photo for the folds' median number of epochs.
    ``train.refit.folds: 0``: fit on train, early-stop on val (one fixed split).
    ``parent_run_id``: the MLflow run this one nests under (a cross-validation's)."""
    started = time.perf_counter()
    folds = refit_folds(cfg)
    cfg = OmegaConf.merge(cfg, {"model_name": model_name})  # what MLflow records
    strategy = make_strategy(cfg.train.strategy)  # first: multi-worker needs a fresh runtime
    chief = is_chief(strategy)
    seed_everything(cfg)
    model_cfg = cfg.model[model_name]
    refit = folds >= 3

    with strategy.scope():
        model = build_model(model_cfg, cfg.data)  # first: missing weights fail before the data
        split = frozen_split(model) if cfg.train.embedding_cache.enabled else None
        fit_model = split.trainable if split is not None else model
    initial_weights = fit_model.get_weights()
    images, labels, files, n_train = non_test_photos(cfg)

    tags = {
        "model_name": model_name,
        "architecture": model_cfg.architecture,
        "weights": weights_source(model_cfg),
        "protocol": tracking.OUT_OF_FOLD_PROTOCOL if refit else tracking.FIXED_SPLIT_PROTOCOL,
        **tracking.run_tags(cfg, f"train@{model_name}"),
    }
    cache_root = Path(cfg.train.embedding_cache.dir)
    cache_root.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=cache_root, prefix=f"{model_name}-") as scratch,
        tracking.mlflow_run(cfg, tags, enabled=chief, parent_run_id=parent_run_id) as active_run,
    ):
        pool, cache_mode, cache_seconds = pooled(cfg, split, images, labels, files, Path(scratch))
        track = active_run is not None
        if track:
            tracking.log_params(cfg)
            mlflow.set_tag("embedding_cache", cache_mode)
            mlflow.log_metric("embedding_cache_build_seconds", cache_seconds)

        def fit(
            fit_index: np.ndarray, stop_index: np.ndarray | None,
            epochs: dict[str, int] | None = None, track: bool = False,
        ) -> tuple[list[dict[str, Any]], pd.DataFrame]:
            return fit_phases(
                cfg, model, fit_model, initial_weights, pool, fit_index, stop_index,
                strategy, epochs, track,
            )  # fmt: skip

        if refit:
            fitted = cross_validated_fit(cfg, model, pool, fit, folds, track)
        else:
            fitted = Fitted(*fit(np.arange(n_train), np.arange(n_train, len(images)), track=track))
        best = next(p for p in reversed(fitted.phases) if p["kept"])
        info = {
            "mlflow_run_id": active_run.info.run_id if active_run else None,
            "experiment_id": active_run.info.experiment_id if active_run else None,
            "model_name": model_name,
            "architecture": model_cfg.architecture,
            "weights": weights_source(model_cfg),
            "protocol": tags["protocol"],
            "epochs_run": len(fitted.frame),
            "best_epoch": best["best_epoch"],
            "phases": fitted.phases,
            "cross_validation": fitted.cross_validation,
            "wall_seconds": round(time.perf_counter() - started, 2),
            "cpu_count": os.cpu_count(),
            "embedding_cache": cache_mode,
        }
        if chief:
            if fitted.oof_outputs is not None:
                write_oof(cfg, model_name, pool, fitted.fold_of, fitted.oof_outputs)
            _write_outputs(cfg, model_name, model, fitted.frame, info, started)

    log.info(
        "%s: %s, %d epoch(s), best epoch %d, %.1f s wall, embedding cache %s",
        model_name, info["protocol"], info["epochs_run"], info["best_epoch"],
        info["wall_seconds"], cache_mode,
    )  # fmt: skip
    return info


def log_fold(model_name: str, fold: int, phases: list[dict[str, Any]], held_out: int) -> None:
    """One nested MLflow run per cross-validation fold of the refit protocol: its phases'
    best epochs and monitor values, beside the parent train run in the UI."""
    with mlflow.start_run(run_name=f"train-{model_name}-fold{fold}", nested=True,
                          tags={"model_name": model_name, "cv_fold": str(fold)}):  # fmt: skip
        mlflow.log_metric("held_out_images", held_out)
        for record in phases:
            if record["epochs"]:
                mlflow.log_metrics({f"{record['phase']}_best_epoch": record["phase_best_epoch"],
                                    f"{record['phase']}_best": record["best"]})  # fmt: skip


def fit_datasets(
    cfg: DictConfig, pool: Pool, fit_index: np.ndarray, stop_index: np.ndarray | None
) -> tuple[tf.data.Dataset, tf.data.Dataset | None]:
    """The pool's ``fit_index`` images as the training dataset (class-weighted, shuffled with
    the run's seed, mixed up when ``mixup_alpha``), and its ``stop_index`` images, plain, for
    early stopping (None without)."""
    model_cfg = cfg.model[cfg.model_name]
    num_classes = len(cfg.data.classes)
    positive_index = list(cfg.data.classes).index(cfg.data.positive_class)
    labels = pool.labels[fit_index]
    weights = class_weights(labels) if cfg.train.class_weights else None
    y = label_array(labels, num_classes, positive_index)
    w = sample_weights(labels, weights)
    if pool.cached:
        train_data = cached_dataset(pool.fit_inputs[:, fit_index], y, w, model_cfg.batch_size,
                                    shuffle_seed=cfg.seed)  # fmt: skip
    else:
        train_data = image_dataset(pool.fit_inputs[fit_index], y, w, model_cfg.batch_size,
                                   shuffle_seed=cfg.seed)  # fmt: skip
    if model_cfg.mixup_alpha:
        train_data = mixup(train_data, model_cfg.mixup_alpha, num_classes, seed=cfg.seed)
    if stop_index is None:
        return train_data, None
    val_y = label_array(pool.labels[stop_index], num_classes, positive_index)
    val_data = (
        cached_dataset(pool.plain_inputs[:, stop_index], val_y, None, model_cfg.batch_size)
        if pool.cached
        else image_dataset(pool.plain_inputs[stop_index], val_y, None, model_cfg.batch_size)
    )
    return train_data, val_data


def phase_callbacks(
    cfg: DictConfig, phase: Phase, early_stop: bool, track: bool, first_step: int
) -> tuple[list[keras.callbacks.Callback], keras.callbacks.EarlyStopping | None]:
    """One phase's callbacks: early stopping on the phase's monitor (restoring the best epoch)
    when there are images to stop on, and per-epoch MLflow metrics from ``first_step`` when
    ``track``; the early stopping itself, whose best epoch the phase's record reads."""
    callbacks: list[keras.callbacks.Callback] = []
    early_stopping = None
    if early_stop:
        early_stopping = keras.callbacks.EarlyStopping(
            monitor=phase.cfg.monitor,
            patience=phase.cfg.patience,
            restore_best_weights=cfg.train.restore_best_weights,
        )
        callbacks.append(early_stopping)
    if track:
        callbacks.append(tracking.MlflowEpochMetrics(first_step=first_step))
    return callbacks, early_stopping


def phase_record(
    name: str, epochs_run: int, done: int, early_stopping: keras.callbacks.EarlyStopping | None
) -> dict[str, Any]:
    """What run.json records of a phase that ran ``epochs_run`` epochs after ``done`` earlier
    ones: its best epoch (within the phase and in the run) and, early-stopped, the best value."""
    if early_stopping is None:  # a refit: the epochs were fixed by cross-validation
        return {"phase": name, "epochs": epochs_run, "phase_best_epoch": epochs_run,
                "best_epoch": done + epochs_run, "kept": True}  # fmt: skip
    phase_best = early_stopping.best_epoch + 1
    return {"phase": name, "epochs": epochs_run, "phase_best_epoch": phase_best,
            "best_epoch": done + phase_best, "best": float(early_stopping.best),
            "kept": True}  # fmt: skip


def fit_phases(
    cfg: DictConfig,
    model: keras.Model,
    fit_model: keras.Model,
    initial_weights: list[np.ndarray],
    pool: Pool,
    fit_index: np.ndarray,
    stop_index: np.ndarray | None,
    strategy: tf.distribute.Strategy,
    epochs: dict[str, int] | None = None,
    track: bool = False,
) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """The one training loop: from the initial weights, fit ``fit_model`` on the pool's
    ``fit_index`` images through every phase. With ``stop_index``: early stopping on those
    images (restoring the best epoch), and a fine-tune phase kept only if it improves the
    monitor. Without: each phase runs ``epochs[phase]`` epochs (0 skips it)."""
    model_cfg = cfg.model[cfg.model_name]
    num_classes = len(cfg.data.classes)
    set_fine_tuning(model, False)
    fit_model.set_weights(initial_weights)
    train_data, val_data = fit_datasets(cfg, pool, fit_index, stop_index)
    steps_per_epoch = math.ceil(len(fit_index) / model_cfg.batch_size)

    frames: list[pd.DataFrame] = []
    phases: list[dict[str, Any]] = []
    for phase in training_phases(model_cfg):
        phase_epochs = phase.cfg.epochs if epochs is None else epochs[phase.name]
        if phase_epochs == 0:
            phases.append({"phase": phase.name, "epochs": 0, "kept": False})
            continue
        set_fine_tuning(model, phase.tune, phase.batchnorm)
        with strategy.scope():  # the learning-rate schedule needs the steps per epoch
            compile_model(fit_model, phase.cfg, num_classes, steps_per_epoch)
        done = sum(map(len, frames))
        callbacks, early_stopping = phase_callbacks(cfg, phase, val_data is not None, track,
                                                    first_step=done + 1)  # fmt: skip
        before = fit_model.get_weights() if phases else None
        with strategy.scope(), multi_worker_fit(fit_model, strategy):
            fitted = fit_model.fit(
                train_data,
                validation_data=val_data,
                epochs=phase_epochs,
                shuffle=False,  # the training dataset shuffles itself, seeded
                callbacks=callbacks,
                verbose=cfg.train.verbose,
            )
        record = phase_record(phase.name, len(fitted.epoch), done, early_stopping)
        if (early_stopping is not None and phases
                and not improves(phase.cfg.monitor, record["best"], phases[-1]["best"])):
            fit_model.set_weights(before)  # fine-tuning did not help on the held-out images
            record["kept"] = False
        phases.append(record)
        frames.append(history_frame(fitted.history))
    frame = pd.concat(frames, ignore_index=True)
    frame["epoch"] = np.arange(1, len(frame) + 1)
    return phases, frame


def write_oof(
    cfg: DictConfig,
    model_name: str,
    pool: Pool,
    fold_of: np.ndarray,
    outputs: np.ndarray,
) -> Path:
    """``oof.csv``: each non-test photo's fold and the raw output of the model that did not
    train on it (TTA-averaged as ``evaluate.tta``), in manifest order."""
    frame = pd.DataFrame(
        {
            "file": [os.path.relpath(f, cfg.paths.prepared_dir) for f in pool.files],
            "label": pool.labels,
            "fold": fold_of,
            **{f"output_{i}": outputs[:, i] for i in range(outputs.shape[1])},
        }
    )
    path = paths.oof_file(cfg, model_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def _write_outputs(
    cfg: DictConfig,
    model_name: str,
    model: keras.Model,
    frame: pd.DataFrame,
    info: dict[str, Any],
    started: float,
) -> None:
    """Model, history and curves to the stage outputs and the active MLflow run; then run.json
    (its wall time includes the saving)."""
    model = inference_copy(model)
    model_path = paths.model_file(cfg, model_name)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model.save(model_path)
    report_dir = paths.train_report_dir(cfg, model_name)
    report_dir.mkdir(parents=True, exist_ok=True)
    frame.to_csv(report_dir / "history.csv", index=False)
    curves = plot_curves(frame, report_dir / "curves.png", f"{model_name} training")

    mlflow.log_artifact(str(curves))
    mlflow.log_text(model_summary(model), "model_summary.txt")
    mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    tracking.log_keras_model(model)
    info["wall_seconds"] = round(time.perf_counter() - started, 2)
    mlflow.log_metrics(
        {"epochs_run": info["epochs_run"], "best_epoch": info["best_epoch"],
         "wall_seconds": info["wall_seconds"]}
    )  # fmt: skip
    tracking.write_run_info(cfg, model_name, info)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Stage entry: train ``cfg.model_name``; a missing weights file is a message, not a trace."""
    try:
        return train(cfg, cfg.model_name)
    except WeightsUnavailableError as err:
        raise SystemExit(f"train@{cfg.model_name}: {err}") from None


main = stage_entry(run)

if __name__ == "__main__":
    main()
