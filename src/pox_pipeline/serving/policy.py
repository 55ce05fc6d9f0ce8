"""The decision policy of a published model: how its outputs become an answer.

:class:`DecisionPolicy` is built from the model's BentoML metadata (plus a site's
``serve.threshold_override``) and turns calibrated probabilities and the guard's score into
answers: the label at the operating threshold, null label and probabilities for an image the
out-of-distribution guard rejects, and the decision in plain words. The service, the CLI,
``pox validate`` and the monitoring reference answer through it; ``model_card`` only renders
what it states. It needs no TensorFlow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from pox_pipeline.common.reporting import interval, undefined
from pox_pipeline.common.temperature import IDENTITY_TEMPERATURE, class_probabilities
from pox_pipeline.models.inference import NO_TTA, TTA_MODES
from pox_pipeline.serving import tflite

if TYPE_CHECKING:
    from bentoml import Model as StoredModel

# The guard's reason for refusing an image, in an answer's ``ood_reason``.
OOD_REASON = "this does not look like a skin photo like those the model was trained on"


@dataclass(frozen=True)
class DecisionPolicy:
    """What the served model's outputs mean and how they become answers (threshold, guard,
    label), from its BentoML metadata."""

    name: str
    version: str
    classes: tuple[str, ...]
    positive_class: str
    threshold: float | None
    image_size: int
    resample: str
    mlflow_run_id: str | None
    temperature: float = IDENTITY_TEMPERATURE
    tta: str = NO_TTA
    # What the threshold trades on the evidence it was set on (plain-words explanations):
    # sensitivity and specificity with their bootstrap intervals (low, value, high).
    val_sensitivity: tuple[float, float, float] | None = None
    val_specificity: tuple[float, float, float] | None = None
    evidence: str = "validation photos"
    # serve.threshold_override: a site's own threshold (pox validate) replacing the published
    published_threshold: float | None = None
    # The TFLite backends converted and published with the model (backend -> file beside it),
    # and what serve.backend=auto serves: the fastest published, measured at publish.
    backend_files: Mapping[str, str] = field(default_factory=dict)
    fastest_backend: str = tflite.KERAS

    @classmethod
    def from_metadata(cls, name: str, version: str, metadata: Mapping[str, Any]) -> DecisionPolicy:
        classes = tuple(metadata["classes"])
        positive = metadata["positive_class"]
        if positive not in classes:
            raise ValueError(f"positive_class {positive!r} is not one of the classes {classes}")
        threshold = metadata.get("threshold")
        if len(classes) == 2 and threshold is None:
            raise ValueError("a binary model needs a decision threshold in its metadata")
        # Models saved before calibration / TTA existed carry neither: T = 1, no TTA.
        temperature = float(metadata.get("temperature", IDENTITY_TEMPERATURE))
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        tta = str(metadata.get("tta", NO_TTA))
        if tta not in TTA_MODES:
            raise ValueError(f"tta={tta!r} in the metadata; known: {TTA_MODES}")
        return cls(
            name=name,
            version=version,
            classes=classes,
            positive_class=positive,
            threshold=None if threshold is None else float(threshold),
            image_size=int(metadata["image_size"]),
            resample=str(metadata["resample"]),
            mlflow_run_id=metadata.get("mlflow_run_id"),
            temperature=temperature,
            tta=tta,
            val_sensitivity=with_interval(selection_evidence(metadata), "sensitivity"),
            val_specificity=with_interval(selection_evidence(metadata), "specificity"),
            evidence=evidence_words(selection_evidence(metadata)),
            backend_files=tflite.published(metadata.get("backends", {})),
            fastest_backend=tflite.fastest(metadata.get("backends", {})),
        )

    def with_threshold_override(self, threshold: float | None) -> DecisionPolicy:
        """The policy a site serves with ``serve.threshold_override`` (None: as published)."""
        if threshold is None:
            return self
        if not self.is_binary:
            raise ValueError("serve.threshold_override applies to binary models only")
        if not 0 < threshold < 1:
            raise ValueError(f"serve.threshold_override must be in (0, 1), got {threshold}")
        return replace(self, threshold=float(threshold), published_threshold=self.threshold)

    @classmethod
    def from_stored(cls, stored: StoredModel) -> DecisionPolicy:
        return cls.from_metadata(stored.tag.name, str(stored.tag.version), stored.info.metadata)

    @property
    def is_binary(self) -> bool:
        return len(self.classes) == 2

    @property
    def positive_index(self) -> int:
        """Which output unit scores the positive class: the single sigmoid, or its softmax slot."""
        return 0 if self.is_binary else self.classes.index(self.positive_class)

    def class_probabilities(self, outputs: np.ndarray) -> np.ndarray:
        """Model outputs -> (N, len(classes)) calibrated probabilities in ``classes`` order,
        with the model's temperature applied as evaluate applied it before choosing the
        threshold: the probability shown is the one the threshold was set on."""
        return class_probabilities(
            outputs, self.temperature, self.classes.index(self.positive_class)
        )

    def result(self, probabilities: np.ndarray, ood_score: float | None = None) -> dict[str, Any]:
        """One image's answer: binary = positive iff P(positive) >= threshold, else argmax;
        with the OOD guard's verdict on ``ood_score`` and the decision in plain words.

        An image the guard rejects gets no label and no probabilities (null): the model's
        scores for a picture unlike every training photo would name a disease for nothing,
        and a client reading ``label``, or ranking by a probability, would act on them."""
        guard = verdict(ood_score)
        label = scores = None
        if guard["in_distribution"]:
            if self.is_binary:
                positive = probabilities[self.classes.index(self.positive_class)]
                negative = next(c for c in self.classes if c != self.positive_class)
                label = self.positive_class if positive >= self.threshold else negative
            else:
                label = self.classes[int(np.argmax(probabilities))]
            scores = {c: float(p) for c, p in zip(self.classes, probabilities, strict=True)}
        answer = {
            "label": label,
            "probability": None if scores is None else scores[label],
            "threshold": self.threshold,
            "probabilities": scores,
            "model": {
                "name": self.name,
                "version": self.version,
                "mlflow_run_id": self.mlflow_run_id,
            },
            **guard,
        }
        answer["explanation"] = self.plain_words(answer)
        return answer

    def results(
        self, outputs: np.ndarray, ood_scores: np.ndarray | None = None
    ) -> list[dict[str, Any]]:
        """Answers for model outputs and (optionally) the OOD scores of the same images."""
        rows = self.class_probabilities(outputs)
        ood_scores = [None] * len(rows) if ood_scores is None else ood_scores
        return [self.result(row, score) for row, score in zip(rows, ood_scores, strict=True)]

    def threshold_trade(self) -> str:
        """What the threshold buys and costs on the photos it was set on, in plain words."""
        if self.threshold is None:
            return "The model names the class it scores highest."
        if self.published_threshold is not None:
            return (
                f"This site serves its own screening threshold of {self.threshold:.0%} "
                "(serve.threshold_override) instead of the published "
                f"{self.published_threshold:.0%}."
            )
        if self.val_sensitivity is None or self.val_specificity is None:
            return f"The screening threshold is {self.threshold:.0%}."
        negative = next(c for c in self.classes if c != self.positive_class)
        return (
            f"On {self.evidence}, the screening threshold of {self.threshold:.0%} caught "
            f"{_rate(self.val_sensitivity)} of {self.positive_class} cases, at the cost of false "
            f"alarms on {_rate(self.val_specificity, complement=True)} of {negative} photos."
        )

    def plain_words(self, answer: Mapping[str, Any]) -> str:
        """Why this label, for a person: a probability below 50% can still be flagged."""
        if not answer["in_distribution"]:
            return (
                f"No label and no probabilities: {answer['ood_reason']}, so the model's scores "
                "for it would mean nothing. Please upload a clear, close photo of the skin lesion."
            )
        if self.threshold is None:
            return (
                f"{answer['label']} scored highest ({answer['probability']:.0%}). "
                + self.threshold_trade()
            )
        score = answer["probabilities"][self.positive_class]
        if answer["label"] == self.positive_class:
            verdict = (
                f"Flagged for a clinician: {self.positive_class} scored {score:.0%}, at or above "
                f"the screening threshold of {self.threshold:.0%}."
            )
        else:
            verdict = (
                f"Not flagged: {self.positive_class} scored {score:.0%}, below the screening "
                f"threshold of {self.threshold:.0%}."
            )
        return f"{verdict} {self.threshold_trade()} This is not a diagnosis."


def verdict(score: float | None) -> dict[str, Any]:
    """The answer's OOD fields: ``in_distribution`` and, when false, ``ood_reason``.

    ``score`` None (or nan) means the check did not run (no guard stored with the model, or
    ``serve.guard_enabled: false``): the answer says so instead of pretending it passed.
    """
    if undefined(score):
        return {"in_distribution": True, "ood": {"checked": False}}
    inside = bool(score <= 1.0)
    answer: dict[str, Any] = {
        "in_distribution": inside,
        "ood": {"checked": True, "score": float(score)},
    }
    if not inside:
        answer["ood_reason"] = (
            f"{OOD_REASON} (its distance to the training photos is {score:.1f} times the limit "
            "that held-out genuine photos stay under)"
        )
    return answer


def with_interval(values: Mapping[str, Any], name: str) -> tuple[float, float, float] | None:
    """(low, value, high) of a metric and its bootstrap interval; the value thrice when the
    interval was not computed."""
    if undefined(values.get(name)):
        return None
    value = float(values[name])
    bounds = interval(values, name)
    return (value, value, value) if bounds is None else (bounds[0], value, bounds[1])


def _rate(rate: tuple[float, float, float], complement: bool = False) -> str:
    """"90% (95% interval 84-95%)"; ``complement``: of 1 - rate (false alarms from specificity)."""
    low, value, high = (1 - rate[2], 1 - rate[1], 1 - rate[0]) if complement else rate
    if low == high:
        return f"{value:.0%}"
    return f"{value:.0%} (95% interval {low:.0%}-{high:.0%})"


def selection_evidence(metadata: Mapping[str, Any]) -> Mapping[str, Any]:
    """The figures the threshold and the choice were set on. Models published before issue 28 keep
    them under ``val_metrics`` (a name that hid that they are out-of-fold); read for one release."""
    evidence = metadata.get("selection_metrics", metadata.get("val_metrics"))
    return evidence if isinstance(evidence, Mapping) else {}


def evidence_words(selection_metrics: Mapping[str, Any]) -> str:
    """What the threshold, the calibration and the choice were set on."""
    n = selection_metrics.get("n_val")
    if n is None:
        return "the validation photos"
    if selection_metrics.get("evidence") == "out_of_fold":
        return (
            f"{n} out-of-fold predictions (every non-test photo, each scored by a model that "
            "did not train on its patient)"
        )
    return f"{n} validation photos"
