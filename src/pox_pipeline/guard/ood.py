"""Out-of-distribution guard: does an upload look like the photos the model was trained on?

A classifier answers every input with one of its classes, a cat photo included. The guard
measures how far an image lies from the training photos in up to two feature spaces
(``publish.guard.spaces``):

- ``head``: the space the model's decision is made in, the input of its final Dense
  ``output`` layer (the penultimate features; for an ensemble, every member's, side by side,
  each member guarded on its own columns: ``head/member_<i>``);
- ``image_statistics``: how the photo looks, whatever the model: the colour, texture and edge
  statistics of :class:`~pox_pipeline.models.colour_texture.ColourTextureFeatures`. A network
  trained from scratch on a couple of hundred photos maps a cat or random noise close to its
  lesions; the statistics do not (benchmarks/ood_rates.py measures both).

In each space every feature is standardised with the training split's mean and spread, and
an image's distance is the mean Euclidean distance (per feature, i.e. divided by sqrt(dims))
to its ``k`` nearest reference photos. The space's threshold is a split-conformal quantile of
held-out distances: each non-test photo's distance to a reference of the other folds' photos
(out of fold; the validation photos' distance to the training photos on a fixed split; for
an ensemble member, the distance of photos it never trained on to its training photos). For
a new genuine photo exchangeable with those, the chance of exceeding the threshold is at
most the space's effective alpha (``publish.guard.alpha`` shared over the spaces), which the
metadata and the model card state. An image's score is its largest distance / threshold
ratio over the spaces: above 1 it is out of distribution.

Fitted when a model is published (``select``, ``ensemble``) and stored beside it in the
BentoML model directory (:data:`OOD_FILE`); serving needs numpy only, plus the feature
extractor built on the model it already runs (Keras, or the same pass converted to TFLite).
The image statistics are taken of the photo average-pooled by ``image_size // statistics_size``
(:func:`image_statistics`), inside the same traced function as the model's answer, so a TFLite
backend computes them in its one converted pass (an antialiased resize has no TFLite op).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pox_pipeline.models.forward import (
    FEATURE_SPACES,
    HEAD,
    IMAGE_STATISTICS,
    feature_extractor,
    head_layers,
)

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

OOD_FILE = "ood.npz"  # inside the BentoML model directory, beside model.keras
METHOD = "knn"
# A feature with (almost) no spread on the training photos is scaled by this share of the
# mean spread instead: such a unit lighting up is a strong sign of an unfamiliar input, and
# must not divide by zero.
MIN_SCALE_RATIO = 0.1
# Which photos set a limit, as the metadata and the card say it (guards saved before it was
# recorded read as the generic one).
HELD_OUT_SOURCE = "held-out photos"
OUT_OF_FOLD_SOURCE = "every non-test photo, each against the other folds' photos"


# How image_statistics shrink the photo, stored with the guard: a guard fitted on other
# statistics (an antialiased resize, before) would measure its thresholds in another space.
STATISTICS_METHOD = "average_pool"

# An ensemble member's head guard is keyed "head/member_<i>": it reads that member's columns
# of the head space.
MEMBER_SEPARATOR = "/"


def space_of(key: str) -> str:
    """The feature space a guard reads (``head/member_1`` reads the head space)."""
    return key.split(MEMBER_SEPARATOR)[0]


def member_key(index: int) -> str:
    return f"{HEAD}{MEMBER_SEPARATOR}member_{index}"


@dataclass(frozen=True)
class OODSettings:
    """``publish.guard``: how the guard is fitted at publish (whether one is fitted, and whether
    the service checks it, are the caller's: ``publish.guard.fit``, ``serve.guard_enabled``)."""

    spaces: tuple[str, ...]
    statistics_size: int
    k: int
    alpha: float  # the stated false-refusal rate of genuine photos, shared over the spaces
    batch_size: int

    @classmethod
    def from_cfg(cls, ood_cfg: Mapping[str, Any]) -> OODSettings:
        values = dict(ood_cfg)
        values["spaces"] = tuple(str(name) for name in values["spaces"])
        settings = cls(**values)
        unknown = set(settings.spaces) - set(FEATURE_SPACES)
        if unknown or not settings.spaces:
            raise ValueError(
                f"publish.guard.spaces={list(settings.spaces)}; choose from {FEATURE_SPACES}"
            )
        if settings.k < 1:
            raise ValueError(f"publish.guard.k must be at least 1, got {settings.k}")
        if not 0 < settings.alpha < 1:
            raise ValueError(f"publish.guard.alpha must be in (0, 1), got {settings.alpha}")
        return settings


# ---------------------------------------------------------------------------- the distance rule


def conformal_rank(n: int, alpha: float) -> tuple[int, float]:
    """Split conformal: the ``ceil((n + 1)(1 - alpha))``-th smallest of ``n`` held-out scores
    bounds a new exchangeable score with probability >= 1 - alpha. Returns that rank and
    the effective alpha ``1 - rank / (n + 1)``; when ``n`` is too small for ``alpha`` the rank
    is ``n`` (the largest score) and the effective alpha 1 / (n + 1), with a warning."""
    if n < 1:
        raise ValueError("no held-out photos to set the guard's threshold on")
    rank = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    if rank > n:
        log.warning(
            "%d held-out photos cannot bound a %.4f false-refusal rate (that needs %d); "
            "the guard states %.4f instead", n, alpha, math.ceil(1 / alpha - 1), 1 / (n + 1),
        )  # fmt: skip
        rank = n
    return rank, 1 - rank / (n + 1)


@dataclass(frozen=True)
class Guard:
    """The fitted rule: reference features (standardised), their scaling, k and the threshold
    (with the alpha it was asked for, the effective alpha it states, and its evidence: how
    many held-out photos and which). ``columns``: the [start, stop) slice of its space's
    features it reads (an ensemble member's share of the head space); None: all of them."""

    mean: np.ndarray
    scale: np.ndarray
    reference: np.ndarray
    k: int
    threshold: float = np.inf
    alpha: float = math.nan
    effective_alpha: float = math.nan
    calibration_photos: int = 0
    calibration_source: str = HELD_OUT_SOURCE
    columns: tuple[int, int] | None = None

    @classmethod
    def of_reference(cls, features: np.ndarray, k: int) -> Guard:
        """Reference = these photos, each feature standardised by their mean and spread; no
        threshold yet."""
        reference = np.asarray(features, np.float64)
        if len(reference) < k:
            raise ValueError(f"{len(reference)} reference photos are fewer than k={k}")
        mean = reference.mean(axis=0)
        spread = reference.std(axis=0)
        floor = MIN_SCALE_RATIO * float(spread.mean()) if spread.any() else 1.0
        scale = np.maximum(spread, floor)
        return cls(mean, scale, (reference - mean) / scale, k)

    def with_threshold(
        self, held_out_distances: np.ndarray, alpha: float, source: str = HELD_OUT_SOURCE
    ) -> Guard:
        """The conformal threshold of held-out photos' distances (photos outside the reference
        they were measured against, like an upload); ``source`` says which photos they are."""
        ordered = np.sort(np.asarray(held_out_distances, np.float64))
        rank, effective = conformal_rank(len(ordered), alpha)
        return replace(self, threshold=float(ordered[rank - 1]), alpha=alpha,
                       effective_alpha=effective, calibration_photos=len(ordered),
                       calibration_source=source)  # fmt: skip

    @classmethod
    def fit(
        cls, train_features: np.ndarray, val_features: np.ndarray, k: int, alpha: float,
        source: str = "validation photos",
    ) -> Guard:  # fmt: skip
        """Fixed split: reference = the training photos; threshold from the held-out
        (validation) photos' distances to them."""
        unfitted = cls.of_reference(train_features, k)
        return unfitted.with_threshold(unfitted.distances(val_features), alpha, source)

    @classmethod
    def fit_out_of_fold(
        cls, features: np.ndarray, folds: np.ndarray, k: int, alpha: float
    ) -> Guard:
        """Reference = every photo; threshold from each photo's distance to a reference of
        the other folds' photos (patient-grouped folds: never its own patient's photos)."""
        held_out = cls.out_of_fold_distances(features, folds, k)
        return cls.of_reference(features, k).with_threshold(held_out, alpha, OUT_OF_FOLD_SOURCE)

    @classmethod
    def out_of_fold_distances(cls, features: np.ndarray, folds: np.ndarray, k: int) -> np.ndarray:
        """Each photo's distance to a reference of the other folds' photos: what an upload of
        a new patient's photo measures, where the photo's own distance to a reference that
        holds it would be too small."""
        held_out = np.empty(len(features))
        for fold in np.unique(folds):
            inside = folds == fold
            held_out[inside] = cls.of_reference(features[~inside], k).distances(features[inside])
        return held_out

    def ratios(self, space_features: np.ndarray) -> np.ndarray:
        """Distance / threshold of each row of its space's features (its columns only)."""
        own = space_features if self.columns is None else space_features[:, slice(*self.columns)]
        return self.distances(own) / self.threshold

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mean distance (per feature) of each row to its k nearest reference photos."""
        z = (np.asarray(features, np.float64) - self.mean) / self.scale
        squared = (
            (z**2).sum(axis=1, keepdims=True)
            - 2 * z @ self.reference.T
            + (self.reference**2).sum(axis=1)
        )
        nearest = np.sort(np.sqrt(np.maximum(squared, 0.0)), axis=1)[:, : self.k]
        return nearest.mean(axis=1) / np.sqrt(z.shape[1])

    def metadata(self) -> dict[str, Any]:
        columns = {} if self.columns is None else {"columns": list(self.columns)}
        return {
            "method": METHOD,
            "feature_dims": int(self.reference.shape[1]),
            "reference_photos": int(self.reference.shape[0]),
            "k": self.k,
            "alpha": self.alpha,
            "effective_alpha": self.effective_alpha,
            "calibration_photos": self.calibration_photos,
            "calibration_source": self.calibration_source,
            "threshold": self.threshold,
            **columns,
        }

    def arrays(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "scale": self.scale,
            "reference": self.reference.astype(np.float32),
            "k": self.k,
            "threshold": self.threshold,
            "alpha": self.alpha,
            "effective_alpha": self.effective_alpha,
            "calibration_photos": self.calibration_photos,
            "calibration_source": self.calibration_source,
            "columns": np.asarray(self.columns or (), np.int64),
        }

    @classmethod
    def from_arrays(cls, stored: Mapping[str, Any]) -> Guard:
        columns = stored.get("columns", ())  # a guard saved before ensembles had member slices
        return cls(
            mean=np.asarray(stored["mean"]),
            scale=np.asarray(stored["scale"]),
            reference=np.asarray(stored["reference"], np.float64),
            k=int(stored["k"]),
            threshold=float(stored["threshold"]),
            alpha=float(stored["alpha"]),
            effective_alpha=float(stored["effective_alpha"]),
            calibration_photos=int(stored["calibration_photos"]),
            calibration_source=str(stored.get("calibration_source", HELD_OUT_SOURCE)),
            columns=tuple(int(c) for c in columns) if len(columns) else None,
        )


@dataclass(frozen=True)
class MemberFeatures:
    """One ensemble member's head features (its ``columns`` of the head space) of the photos
    it trained on (``reference``) and of photos it never trained on (``held_out``, described
    by ``source``)."""

    reference: np.ndarray
    held_out: np.ndarray
    source: str
    columns: tuple[int, int]


def score_of(space_ratios: np.ndarray) -> np.ndarray:
    """The OOD score of each row of (N, spaces) distance / threshold ratios: the largest over
    the guarded spaces (above 1: out of distribution), nan where no space is guarded."""
    return np.fmax.reduce(space_ratios, axis=1)


@dataclass(frozen=True)
class GuardSet:
    """One :class:`Guard` per feature space; an image's score is its worst distance /
    threshold ratio (above 1: out of distribution)."""

    guards: dict[str, Guard]
    statistics_size: int

    @classmethod
    def fit(
        cls,
        train: Mapping[str, np.ndarray],
        val: Mapping[str, np.ndarray],
        settings: OODSettings,
    ) -> GuardSet:
        """Fixed split: the validation photos set each space's threshold."""
        alpha = settings.alpha / len(settings.spaces)
        guards = {space: Guard.fit(train[space], val[space], settings.k, alpha)
                  for space in settings.spaces}  # fmt: skip
        return cls(guards, settings.statistics_size)

    @classmethod
    def fit_out_of_fold(
        cls, features: Mapping[str, np.ndarray], folds: np.ndarray, settings: OODSettings
    ) -> GuardSet:
        """Every photo is the reference; out-of-fold distances set each space's threshold."""
        alpha = settings.alpha / len(settings.spaces)
        guards = {space: Guard.fit_out_of_fold(features[space], folds, settings.k, alpha)
                  for space in settings.spaces}  # fmt: skip
        return cls(guards, settings.statistics_size)

    @classmethod
    def fit_members(
        cls,
        members: Sequence[MemberFeatures],
        statistics: tuple[np.ndarray, np.ndarray] | None,
        settings: OODSettings,
    ) -> GuardSet:
        """An ensemble: one head guard per member (``head/member_<i>``, reading its columns of
        the head space), its reference the member's training photos and its threshold from
        photos that member never trained on; ``statistics`` (model-free: any held-out photos
        will do) is (reference, held-out) image statistics, when that space is guarded."""
        count = len(members) * (HEAD in settings.spaces) + (statistics is not None)
        alpha = settings.alpha / count
        guards = {}
        if HEAD in settings.spaces:
            for index, member in enumerate(members):
                guard = Guard.fit(member.reference, member.held_out, settings.k, alpha,
                                  member.source)  # fmt: skip
                guards[member_key(index)] = replace(guard, columns=member.columns)
        if statistics is not None:
            guards[IMAGE_STATISTICS] = Guard.fit(*statistics, settings.k, alpha)
        return cls(guards, settings.statistics_size)

    @property
    def stated_rate(self) -> float:
        """The share of genuine photos the guard may refuse: at most the sum of its spaces'
        effective alphas (a union bound)."""
        return float(sum(guard.effective_alpha for guard in self.guards.values()))

    def out_of_fold_ratios(
        self, features: Mapping[str, np.ndarray], folds: np.ndarray
    ) -> np.ndarray:
        """(N, len(FEATURE_SPACES)): each photo's out-of-fold distance / threshold per space
        (nan for a space not guarded), as ``monitor.monitored_columns`` orders them."""
        count = len(folds)
        return np.stack([
            Guard.out_of_fold_distances(features[space], folds, guard.k) / guard.threshold
            if (guard := self.guards.get(space)) is not None else np.full(count, np.nan)
            for space in FEATURE_SPACES
        ], axis=1)  # fmt: skip

    def space_ratios(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """(N, len(FEATURE_SPACES)): each photo's distance / threshold per space, the largest
        over an ensemble's member guards (nan for a space not guarded)."""
        count = len(features[HEAD])
        columns = []
        for space in FEATURE_SPACES:
            ratios = [guard.ratios(features[space]) for key, guard in self.guards.items()
                      if space_of(key) == space]  # fmt: skip
            columns.append(np.max(ratios, axis=0) if ratios else np.full(count, np.nan))
        return np.stack(columns, axis=1)

    def scores(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """Each photo's OOD score (:func:`score_of` its :meth:`space_ratios`)."""
        return score_of(self.space_ratios(features))

    def metadata(self) -> dict[str, Any]:
        """What travels in the model's metadata (and the model card)."""
        return {
            "rule": "out of distribution when the distance in any space exceeds its threshold",
            "stated_false_refusal_rate": self.stated_rate,
            "statistics_size": self.statistics_size,
            "statistics_method": STATISTICS_METHOD,
            "spaces": {space: guard.metadata() for space, guard in self.guards.items()},
        }

    def save(self, path: Path) -> Path:
        arrays: dict[str, Any] = {"statistics_size": self.statistics_size,
                                  "statistics_method": STATISTICS_METHOD}  # fmt: skip
        for space, guard in self.guards.items():
            arrays.update({f"{space}.{key}": value for key, value in guard.arrays().items()})
        np.savez(path, **arrays)
        return path

    @classmethod
    def load(cls, path: Path) -> GuardSet:
        with np.load(path) as stored:
            spaces = dict.fromkeys(key.split(".")[0] for key in stored.files if "." in key)
            guards = {
                space: Guard.from_arrays({key.split(".", 1)[1]: stored[key]
                                          for key in stored.files if key.startswith(f"{space}.")})
                for space in spaces
            }  # fmt: skip
            method = str(stored["statistics_method"]) if "statistics_method" in stored else None
            if IMAGE_STATISTICS in guards and method != STATISTICS_METHOD:
                raise ValueError(
                    f"the guard in {path} was fitted on image statistics of a resized photo, not "
                    f"the {STATISTICS_METHOD} ones this version computes: publish the model "
                    "again (`dvc repro select`)"
                )
            return cls(guards, int(stored["statistics_size"]))


# ---------------------------------------------------------------------------- publishing


def features_of(
    model: keras.Model, images: np.ndarray, settings: OODSettings, tta: str
) -> dict[str, np.ndarray]:
    """The guard's features of many images as the service computes them (the same extractor
    and TTA views), in batches of ``settings.batch_size``."""
    from pox_pipeline.models.inference import tta_views

    if not len(images):
        raise ValueError("no images to compute features of")
    extract = feature_extractor(model, images.shape[1], settings.spaces, settings.statistics_size)
    parts = []
    for start in range(0, len(images), settings.batch_size):
        views = tta_views(images[start : start + settings.batch_size], tta)
        parts.append(extract(np.concatenate(views), len(views))[1])
    return {space: np.concatenate([part[space] for part in parts]) for space in settings.spaces}


def fit_guard(
    model: keras.Model, train: np.ndarray, val: np.ndarray, settings: OODSettings, tta: str
) -> GuardSet:
    """Fixed split: reference = the training photos, thresholds from the validation photos
    (model inputs, as ``data.load_split`` gives them)."""
    return GuardSet.fit(
        features_of(model, train, settings, tta), features_of(model, val, settings, tta), settings
    )


def fit_guard_out_of_fold(
    model: keras.Model, images: np.ndarray, folds: np.ndarray, settings: OODSettings, tta: str
) -> tuple[GuardSet, np.ndarray]:
    """Reference = every non-test photo, thresholds from out-of-fold distances (``folds``:
    the patient-grouped folds the model was cross-validated on); also returns each photo's
    out-of-fold ratios (:meth:`GuardSet.out_of_fold_ratios`)."""
    features = features_of(model, images, settings, tta)
    guard = GuardSet.fit_out_of_fold(features, folds, settings)
    return guard, guard.out_of_fold_ratios(features, folds)


def head_widths(model: keras.Model) -> list[int]:
    """How many head features each :func:`head_layers` layer reads (one per ensemble member,
    in member order): the widths of the head space's consecutive column blocks."""
    return [int(layer.kernel.shape[0]) for layer in head_layers(model)]


def fit_member_guards(
    model: keras.Model,
    members: Sequence[tuple[np.ndarray, np.ndarray, str]],
    settings: OODSettings,
    tta: str,
) -> GuardSet:
    """An ensemble's guard (:meth:`GuardSet.fit_members`). ``members``: per member, in member
    order, (the photos it trained on, photos it never trained on, which those are), model
    inputs. Each member's head features are read through the whole ensemble, as the service
    reads them; the model-free image statistics from the first member's photos."""
    bounds = np.cumsum([0, *head_widths(model)])
    if len(bounds) - 1 != len(members):
        raise ValueError(f"{len(members)} members' photos for {len(bounds) - 1} head layers")
    guard_heads = HEAD in settings.spaces
    fitted, statistics = [], None
    for index, (reference, held_out, source) in enumerate(members):
        if index and not guard_heads:
            break
        wanted = replace(settings, spaces=settings.spaces if index == 0 else (HEAD,))
        ref, held = (features_of(model, photos, wanted, tta) for photos in (reference, held_out))
        if guard_heads:
            columns = (int(bounds[index]), int(bounds[index + 1]))
            own = slice(*columns)
            fitted.append(MemberFeatures(ref[HEAD][:, own], held[HEAD][:, own], source, columns))
        if IMAGE_STATISTICS in wanted.spaces:
            statistics = (ref[IMAGE_STATISTICS], held[IMAGE_STATISTICS])
    return GuardSet.fit_members(fitted, statistics, settings)
