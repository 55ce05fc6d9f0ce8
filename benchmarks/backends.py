"""Serving backends side by side: Keras (compiled call) vs TFLite fp32 vs TFLite int8.

For one stored model and one folder of labelled photos (``<dir>/<class>/*``, e.g. the
prepared test split), prints each backend's accuracy, its label agreement with Keras, the
largest probability change, and milliseconds per image at batch 1 and batch N, with the
speed ratio against Keras measured in the same run.

examples:
  python benchmarks/backends.py                          # champion, datas/prepared/test
  python benchmarks/backends.py --bento-tag pox-classifier:latest --images datas/prepared/test
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from pox_pipeline import preprocess
from pox_pipeline.config import project_root
from pox_pipeline.serve import BACKENDS, Predictor

PROJECT_ROOT = project_root()

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


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
    parser.add_argument("--batch", type=int, default=32, help="large batch size (default: 32)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repetitions, median reported (default: 5)")
    return parser.parse_args(argv)


def labelled_inputs(folder: Path, image_size: int, resample: str) -> tuple[np.ndarray, list[str]]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"no photos under {folder}: run `dvc repro` or pass --images")
    inputs = np.stack([preprocess.preprocess_file(p, image_size, resample) for p in files])
    return inputs, [p.parent.name for p in files]


def ms_per_image(run: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, repeats: int) -> float:
    """Median wall milliseconds per image of ``run(batch)``, after one untimed call."""
    run(batch)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(batch)
        seconds.append(time.perf_counter() - started)
    return 1000 * statistics.median(seconds) / len(batch)


def main(argv: Sequence[str] | None = None) -> None:
    import bentoml

    args = parse_args(argv)
    stored = bentoml.models.get(args.bento_tag)
    predictors = {backend: Predictor.from_stored(stored, backend) for backend in BACKENDS}
    card = predictors["keras"].card
    inputs, truth = labelled_inputs(args.images, card.image_size, card.resample)
    large = inputs[np.arange(args.batch) % len(inputs)]
    answers = {b: card.results(p.outputs(inputs)) for b, p in predictors.items()}
    reference = answers["keras"]

    print(f"model {stored.tag} ({stored.info.metadata.get('architecture')}, "
          f"{card.image_size} px), {len(inputs)} photos from {args.images}, "
          f"{os.cpu_count()} CPU cores")  # fmt: skip
    header = (f"{'backend':<12} {'accuracy':>8} {'agree':>6} {'max |dp|':>8} "
              f"{'ms/img b1':>10} {'ms/img b' + str(args.batch):>11} {'speed b1':>9} "
              f"{'speed b' + str(args.batch):>10}")  # fmt: skip
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
        print(f"{backend:<12} {accuracy:>8.3f} {agree:>6.3f} {drift:>8.4f} {one:>10.2f} "
              f"{many:>11.2f} {timings['keras'][0] / one:>8.2f}x "
              f"{timings['keras'][1] / many:>9.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
