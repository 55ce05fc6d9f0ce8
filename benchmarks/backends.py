"""Serving backends side by side: Keras (compiled call) vs the TFLite conversions published
with the model (fp32, int8 weights, full integer), run from their stored bytes.

For one stored model and one folder of labelled photos (``<dir>/<class>/*``, e.g. the
prepared test split), prints each backend's accuracy, its label agreement with Keras, the
largest probability change, milliseconds per image and images per second at batch 1 and
batch N, with the speed ratio against Keras measured in the same run. Publishing measured the
same on the evidence and test photos (the model card's "Serving backends"); a backend that was
not published cannot be run.

examples:
  python benchmarks/backends.py                          # champion, datas/prepared/test
  python benchmarks/backends.py --bento-tag pox-classifier:latest --images datas/prepared/test
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from pox_pipeline.common.params import project_root
from pox_pipeline.models.inference import median_call_ms
from pox_pipeline.ops.backends import folder_inputs
from pox_pipeline.serving.scoring import Predictor

PROJECT_ROOT = project_root()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bento-tag", default="pox-classifier:latest",
                        help="model in the BentoML store (default: %(default)s)")
    parser.add_argument("--images", type=Path, default=PROJECT_ROOT / "datas/prepared/test",
                        help="folder of <class>/<photo> files (default: the prepared test split)")
    parser.add_argument("--threads", type=int, default=2,
                        help="TFLite interpreter threads (default: 2)")
    parser.add_argument("--backends", nargs="+",
                        help="backends to measure (default: all published with the model; keras "
                             "is always the reference)")
    parser.add_argument("--batch", type=int, default=32, help="large batch size (default: 32)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repetitions, median reported (default: 5)")
    return parser.parse_args(argv)


def ms_per_image(run: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, repeats: int) -> float:
    """Median wall milliseconds per image of ``run(batch)``, after one untimed call."""
    return median_call_ms(run, batch, repeats) / len(batch)


def main(argv: Sequence[str] | None = None) -> None:
    import bentoml

    args = parse_args(argv)
    stored = bentoml.models.get(args.bento_tag)
    keras_predictor = Predictor.from_stored(stored)
    policy = keras_predictor.policy
    predictors = {"keras": keras_predictor} | {
        backend: Predictor.from_stored(stored, backend, args.threads,
                                       batch_sizes=(1, args.batch))  # the two timed sizes
        for backend in (args.backends or policy.backend_files) if backend != "keras"
    }
    inputs, files = folder_inputs(args.images, policy)
    truth = [p.parent.name for p in files]
    large = inputs[np.arange(args.batch) % len(inputs)]
    answers = {b: policy.results(p.outputs(inputs)) for b, p in predictors.items()}
    reference = answers["keras"]

    print(f"model {stored.tag} ({stored.info.metadata.get('architecture')}, "
          f"{policy.image_size} px), {len(inputs)} photos from {args.images}, "
          f"{os.cpu_count()} CPU cores")  # fmt: skip
    header = (f"{'backend':<17} {'accuracy':>8} {'agree':>6} {'max |dp|':>8} "
              f"{'ms/img b1':>10} {'img/s b1':>9} {'ms/img b' + str(args.batch):>11} "
              f"{'speed b1':>9} {'speed b' + str(args.batch):>10}")  # fmt: skip
    print(header)
    print("-" * len(header))
    timings = {
        backend: (
            ms_per_image(predictor.outputs, inputs[:1], args.repeats),
            ms_per_image(predictor.outputs, large, args.repeats),
        )
        for backend, predictor in predictors.items()
    }
    for backend, results in answers.items():
        accuracy = np.mean([r["label"] == t for r, t in zip(results, truth, strict=True)])
        agree = np.mean([r["label"] == k["label"] for r, k in zip(results, reference, strict=True)])
        drift = max(
            abs(r["probability"] - k["probabilities"][r["label"]])
            for r, k in zip(results, reference, strict=True)
        )
        one, many = timings[backend]
        print(f"{backend:<17} {accuracy:>8.3f} {agree:>6.3f} {drift:>8.4f} {one:>10.2f} "
              f"{1000 / one:>9.1f} {many:>11.2f} {timings['keras'][0] / one:>8.2f}x "
              f"{timings['keras'][1] / many:>9.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
