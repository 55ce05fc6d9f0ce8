"""TFLite backends: converted once at publish (``publish``), run from the stored bytes when
serving (``serve.Predictor``), never converted there.

A converted model has one signature with separate named outputs, ``forward.OUTPUTS`` (the
model's answer), ``forward.HEAD`` (the guard's head features) and ``forward.IMAGE_STATISTICS`` (the
guard's image statistics, on backends whose activations stay float): full-integer quantisation
gives each tensor its own scale, so the probability is never quantised over the head features'
range. A :class:`Runner` runs batches of a few fixed sizes only, one interpreter each, so no
interpreter ever re-allocates its tensors for a new batch size. TensorFlow is imported inside
the functions, so the API process, which reads which
backends a model has (:func:`published`), starts without it.
"""

from __future__ import annotations

import math
import os
import re
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pox_pipeline.models.forward import outputs_with_head

if TYPE_CHECKING:
    import keras

KERAS = "keras"
AUTO = "auto"  # serve.backend: the fastest backend published with the model
BACKENDS = ("tflite_fp32", "tflite_int8", "tflite_full_int8")
# Backends whose conversion sets activation ranges on a representative dataset (training photos,
# at publish). Their integer kernels cannot compute the image statistics (int8 division by a
# quantised zero fails at run time), so those are converted without them.
REPRESENTATIVE_DATA_BACKENDS = ("tflite_full_int8",)
AUTO_THREADS = "auto"  # serve.tflite_threads: every core this process may use
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"  # cgroup v2: "<quota> <period>" or "max <period>"


def thread_count(setting: int | str, processes: int = 1, cpu_max: str = CGROUP_CPU_MAX) -> int:
    """``serve.tflite_threads``: a count, or ``auto``: the cores this process may run on
    (:func:`usable_cores`) shared among the ``processes`` that run the model side by side
    (``serve.model_workers``), at least one each. Measured on 2 idle cores (docs/serving.md): one
    model process with 2 threads answered 24% more 224-px uploads than with 1, and as many phone
    uploads, beside the API process."""
    if setting != AUTO_THREADS:
        return int(setting)
    return max(1, usable_cores(cpu_max) // processes)


def usable_cores(cpu_max: str = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may run on, capped by its cgroup's CPU quota (``docker run
    --cpus 2`` or a Kubernetes limit leaves the host's cores visible to the affinity mask, and a
    thread per host core would then fight over two cores' worth of time)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path(cpu_max).read_text().split()[:2]
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    return max(1, min(cores, math.ceil(int(quota) / int(period))))


def batch_plan(count: int, sizes: Sequence[int]) -> list[tuple[int, int]]:
    """How a batch of ``count`` rows runs on interpreters of fixed ``sizes``: (size, rows) per
    call, the largest size that the remaining rows fill first; rows < size only when fewer rows
    remain than the smallest size (those calls are padded)."""
    ordered = sorted(set(sizes))
    plan = []
    while count > 0:
        filled = [size for size in ordered if size <= count]
        size = filled[-1] if filled else ordered[0]
        plan.append((size, min(size, count)))
        count -= size
    return plan


@dataclass(frozen=True)
class BackendCheck:
    """``publish.backend_check``: how a converted backend is measured at publish, and how close
    to Keras it must answer on the selection evidence to be published."""

    representative_photos: int  # TFLite's representative dataset for tflite_full_int8
    min_label_agreement: float
    max_probability_difference: float
    latency_repeats: int
    batch_size: int

    def passes(self, label_agreement: float, max_probability_difference: float) -> bool:
        return (
            label_agreement >= self.min_label_agreement
            and max_probability_difference <= self.max_probability_difference
        )


def file_name(backend: str) -> str:
    """The converted model's file beside the Keras model in its BentoML folder."""
    return f"{backend}.tflite"


def published(backends: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """metadata["backends"] -> {published TFLite backend: its file}."""
    return {name: row["file"] for name, row in backends.items()
            if name != KERAS and row.get("published")}  # fmt: skip


def fastest(backends: Mapping[str, Mapping[str, Any]]) -> str:
    """What ``serve.backend: auto`` serves: of Keras and the published backends, the one with
    the lowest median milliseconds per photo measured at publish (Keras when none was)."""
    timed = {name: row["ms_per_photo"] for name, row in backends.items()
             if (name == KERAS or row.get("published")) and "ms_per_photo" in row}  # fmt: skip
    return min(timed, key=timed.__getitem__) if timed else KERAS


def convert(
    function: Any, model: keras.Model, backend: str, representative: np.ndarray | None
) -> bytes:
    """A traced function of ``model`` (:func:`forward.outputs_with_head`) converted to ``backend``,
    one signature whose outputs keep their names:
    ``tflite_fp32``; ``tflite_int8``, int8 weights with float activations (dynamic range); or
    ``tflite_full_int8``, int8 weights and activations, the activation ranges set on
    ``representative`` (TFLite's representative dataset: model inputs of training photos),
    float32 in and out."""
    import tensorflow as tf

    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; TFLite backends are {BACKENDS}")
    # A bare module as the trackable object: the converter saves it with the frozen function as
    # its signature, which keeps the outputs' names. Saving the Keras model instead fails for a
    # model with random augmentation layers (their seed state), and the converter then silently
    # falls back to a flatbuffer without a signature.
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [named_frozen(function)], tf.Module()
    )
    if backend != "tflite_fp32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if backend in REPRESENTATIVE_DATA_BACKENDS:
        if representative is None or not len(representative):
            raise ValueError(f"{backend} needs representative photos")
        samples = np.asarray(representative, np.float32)
        converter.representative_dataset = lambda: ([image[None]] for image in samples)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    try:
        return converter.convert()
    except Exception as err:  # noqa: BLE001 - the converter raises several error types
        lacking = sorted(set(re.findall(r"'tf\.(\w+)' op is neither", str(err))))
        raise ValueError(
            f"model {model.name!r} cannot be converted to TFLite"
            + (f" (TFLite has no {', '.join(lacking)} op)" if lacking else "")
            + "; serve it with serve.backend=keras"
        ) from None


def named_frozen(function: Any) -> Any:
    """``function`` with its variables folded into constants and its outputs' names kept.

    The converter's signature path keeps Keras 3 variables as resource reads, which full-integer
    calibration cannot run; freezing alone names the outputs ``output_0``, ``output_1``."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    frozen = convert_variables_to_constants_v2(function)

    def named(batch: Any) -> Any:
        return tf.nest.pack_sequence_as(function.structured_outputs,
                                        tf.nest.flatten(frozen(batch)))  # fmt: skip

    signature = list(function.structured_input_signature[0])
    return tf.function(named, input_signature=signature).get_concrete_function()


class Runner:
    """Stored TFLite bytes run on CPU through their signature: a float32 (N, S, S, 3) batch ->
    {output name: array}. With ``batch_sizes`` (the service's), in calls of those sizes only
    (:func:`batch_plan`), each on an interpreter allocated once for its size; without, whole
    batches on one interpreter, which re-allocates whenever the batch size changes (offline
    scoring)."""

    def __init__(
        self, flatbuffer: bytes, threads: int | None = None,
        batch_sizes: Sequence[int] | None = None,
    ) -> None:  # fmt: skip
        self.flatbuffer = flatbuffer
        self.batch_sizes = tuple(sorted(set(batch_sizes))) if batch_sizes else None
        # kept: a signature runner reads freed memory once its interpreter is collected
        self._interpreters = {size: self._interpreter(threads)
                              for size in self.batch_sizes or (None,)}  # fmt: skip
        signatures = next(iter(self._interpreters.values())).get_signature_list()
        if len(signatures) != 1:
            raise ValueError(
                f"the TFLite model has {len(signatures)} signatures, not one: re-publish it "
                "(select or ensemble converts it with its named outputs)"
            )
        [(key, signature)] = signatures.items()
        [self._input] = signature["inputs"]
        self.output_names = tuple(signature["outputs"])
        self._signatures = {size: interpreter.get_signature_runner(key)
                            for size, interpreter in self._interpreters.items()}  # fmt: skip
        for size in self.batch_sizes or ():  # allocate each once, now, not on a request
            details = self._signatures[size].get_input_details()[self._input]
            shape = tuple(int(d) for d in details["shape_signature"][1:])
            self._run(size, np.zeros((size, *shape), np.float32))
        self._lock = threading.Lock()  # an interpreter is not thread-safe

    def _interpreter(self, threads: int | None) -> Any:
        import tensorflow as tf

        with warnings.catch_warnings():
            # Deprecated in favour of ai_edge_litert, which TensorFlow does not install.
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
            return tf.lite.Interpreter(model_content=self.flatbuffer, num_threads=threads)

    def _run(self, size: int | None, batch: np.ndarray) -> dict[str, np.ndarray]:
        answer = self._signatures[size](**{self._input: batch})
        return {name: tensor.copy() for name, tensor in answer.items()}

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = np.asarray(batch, np.float32)
        parts, start = [], 0
        with self._lock:
            plan = (batch_plan(len(batch), self.batch_sizes) if self.batch_sizes
                    else [(None, len(batch))])  # fmt: skip
            for size, rows in plan:
                chunk = batch[start : start + rows]
                if size is not None and rows < size:
                    chunk = np.concatenate([chunk, np.zeros((size - rows, *chunk.shape[1:]),
                                                            np.float32)])  # fmt: skip
                answer = self._run(size, chunk)
                parts.append({name: tensor[:rows] for name, tensor in answer.items()})
                start += rows
        return {name: np.concatenate([part[name] for part in parts]) for name in self.output_names}


def representative_photos(images: np.ndarray, count: int) -> np.ndarray:
    """At most ``count`` of ``images``, spread evenly over them (so over every class): the
    representative dataset a full-integer conversion sets its activation ranges on."""
    if len(images) <= count:
        return images
    return images[np.linspace(0, len(images) - 1, count).round().astype(int)]


def converted(
    model: keras.Model,
    image_size: int,
    backend: str,
    representative: np.ndarray | None,
    statistics_size: int | None = None,
) -> bytes:
    """``model``'s outputs and head features, and the image statistics at ``statistics_size``
    (None: none; never on a full-integer backend), as ``backend``'s bytes."""
    if backend in REPRESENTATIVE_DATA_BACKENDS:
        statistics_size = None
    function = outputs_with_head(model, image_size, statistics_size)
    return convert(function, model, backend, representative)
