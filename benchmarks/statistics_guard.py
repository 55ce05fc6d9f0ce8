"""The guard's image-statistics space on real photos: the antialiased 128-px resize it used
before against the average-pooled thumbnail it uses now (inside the converted pass).

Model-free: the statistics do not depend on the champion, so no training is needed. Prepares
the MSLD photos (patient-grouped split, into a temporary folder), fits the statistics space
alone as publishing fits a fixed split (reference: the training photos; threshold: the
split-conformal rank of the validation photos' distances at ``publish.guard.alpha`` shared over
the two spaces), and prints for each way of shrinking the photo the share of held-out test
photos and of each kind of clearly non-skin image (``pox_pipeline.guard.non_skin``) it flags, and
its milliseconds per photo (TensorFlow, batch 32).

    python benchmarks/statistics_guard.py --raw ../shared/datasets/msld
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from pox_pipeline.common import preprocess
from pox_pipeline.common.config import compose
from pox_pipeline.data.prepare import load_split, prepare
from pox_pipeline.guard import non_skin, ood
from pox_pipeline.models import forward

BEFORE_SIZE = 128  # the guard's statistics_size before the pooled statistics
BATCH = 32


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--raw", type=Path, default=Path("../shared/datasets/msld"),
                        help="class folders of photos (default: %(default)s)")  # fmt: skip
    parser.add_argument("--statistics-sizes", type=int, nargs="+",
                        help="pooled sizes to compare (default: publish.guard.statistics_size)")
    return parser.parse_args(argv)


def ways(
    image_size: int, statistics_sizes: Sequence[int]
) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Name -> batch statistics: the antialiased resize before, the pooled thumbnails now."""
    import keras

    from pox_pipeline.models.colour_texture import ColourTextureFeatures
    from pox_pipeline.models.inference import run_traced, traced

    describe = ColourTextureFeatures()
    resize = keras.layers.Resizing(BEFORE_SIZE, BEFORE_SIZE, antialias=True)
    found = {f"before: antialiased resize to {BEFORE_SIZE} px":
             run_traced(traced(lambda batch: describe(resize(batch)), image_size))}  # fmt: skip
    for size in statistics_sizes:
        side = image_size // forward.statistics_pool(image_size, size)
        pooled = forward.image_statistics(image_size, size)
        found[f"average-pooled to {side} px"] = run_traced(traced(pooled, image_size))
    return found


def batched(statistics: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    return np.concatenate([statistics(images[i : i + BATCH]) for i in range(0, len(images), BATCH)])


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(["data=msld", f"data.raw_dir={args.raw.resolve()}",
                       f"paths.prepared_dir={tmp}/prepared", f"paths.reports_dir={tmp}/reports"])
        prepare(cfg)
        splits = {split: load_split(cfg, split)[0] for split in ("train", "val", "test")}
    size, settings = int(cfg.data.image_size), cfg.publish.guard
    alpha = float(settings.alpha) / len(settings.spaces)
    others: dict[str, list[np.ndarray]] = defaultdict(list)
    for kind, _, image in non_skin.images():
        others[kind].append(preprocess.to_model_input(image, size, cfg.data.resample))
    sets = {"held-out MSLD test photos": splits["test"],
            **{kind: np.stack(images) for kind, images in others.items()},
            "clearly non-skin images, all": np.concatenate([np.stack(i) for i in others.values()])}
    print(f"reference {len(splits['train'])} training photos, threshold from "
          f"{len(splits['val'])} validation photos, alpha {alpha:.3f}, k {settings.k}")
    header = ["set", "images"]
    columns: list[list[str]] = []
    sizes = args.statistics_sizes or [int(settings.statistics_size)]
    for name, statistics in ways(size, sizes).items():
        batched(statistics, splits["val"][:BATCH])  # trace
        started = time.perf_counter()
        train = batched(statistics, splits["train"])
        ms = (time.perf_counter() - started) * 1000 / len(splits["train"])
        guard = ood.Guard.fit(train, batched(statistics, splits["val"]), int(settings.k), alpha)
        header.append(f"{name} ({ms:.2f} ms/photo)")
        flagged = [guard.distances(batched(statistics, images)) > guard.threshold
                   for images in sets.values()]  # fmt: skip
        columns.append([f"{hits.mean():.1%}" for hits in flagged])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row, (name, images) in enumerate(sets.items()):
        print(f"| {name} | {len(images)} | " + " | ".join(c[row] for c in columns) + " |")


if __name__ == "__main__":
    main()
