"""Seconds per training epoch of VGG16: plain ``model.fit`` through the frozen layers vs the
embedding cache used by ``pox_pipeline.training.train`` (cache build timed separately).

Same random images, same model config (params.yaml + the options below), for each freeze
setting. Epoch 1 includes graph tracing, so with --epochs >= 2 it is left out of s/epoch.

    .venv/bin/python benchmarks/train_speed.py --image-size 224 --images 48 --epochs 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from pox_pipeline.common.params import load_params, project_root
from pox_pipeline.models.architectures import build_model, compile_model, frozen_split
from pox_pipeline.training.train import build_embedding_cache, cached_dataset, image_dataset

PROJECT_ROOT = project_root()


class EpochTimer(keras.callbacks.Callback):
    """Wall seconds of every epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.seconds.append(time.perf_counter() - self._started)


def seconds_per_epoch(timer: EpochTimer) -> float:
    """Mean epoch time without the first (tracing) epoch when there is more than one."""
    timed = timer.seconds[1:] if len(timer.seconds) > 1 else timer.seconds
    return statistics.mean(timed)


def time_plain(cfg, images: np.ndarray, labels: np.ndarray, epochs: int) -> float:
    keras.utils.set_random_seed(cfg.seed)
    model = compile_model(build_model(cfg.model.vgg16, cfg.data), cfg.model.vgg16, 2)
    data = image_dataset(images, labels, None, cfg.model.vgg16.batch_size, cfg.seed)
    timer = EpochTimer()
    model.fit(data, epochs=epochs, callbacks=[timer], shuffle=False, verbose=0)
    return seconds_per_epoch(timer)


def time_cached(
    cfg, images: np.ndarray, labels: np.ndarray, epochs: int, cache_dir: Path
) -> tuple[float, float, str]:
    keras.utils.set_random_seed(cfg.seed)
    split = frozen_split(build_model(cfg.model.vgg16, cfg.data))
    compile_model(split.trainable, cfg.model.vgg16, 2)
    cache = build_embedding_cache(
        split,
        images,
        images[:0],
        views=cfg.model.vgg16.augment.cached_copies,
        batch_size=cfg.model.vgg16.batch_size,
        max_memory_mb=cfg.train.embedding_cache.max_memory_mb,
        directory=cache_dir,
    )
    data = cached_dataset(cache.train, labels, None, cfg.model.vgg16.batch_size, cfg.seed)
    timer = EpochTimer()
    split.trainable.fit(data, epochs=epochs, callbacks=[timer], shuffle=False, verbose=0)
    return seconds_per_epoch(timer), cache.build_seconds, cache.mode


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, the example command kept as written."""


def parse_args() -> argparse.Namespace:
    description, details = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(
        description=description, epilog=details, formatter_class=_HelpFormatter
    )
    parser.add_argument("--image-size", type=int, default=224, help="square input size (px)")
    parser.add_argument("--images", type=int, default=48, help="number of training images")
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed per setting")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch size")
    parser.add_argument(
        "--freeze", nargs="+", default=["13", "all"],
        help="model.vgg16.freeze settings to compare (layer counts, layer names or 'all')",
    )  # fmt: skip
    parser.add_argument(
        "--params", type=Path, default=PROJECT_ROOT / "params.yaml", help="composed config"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="extra dotlist overrides, e.g. model.vgg16.augment.enabled=true",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    rng = np.random.default_rng(0)
    shape = (args.images, args.image_size, args.image_size, 3)
    images = rng.uniform(0, 255, shape).astype(np.float32)
    labels = (np.arange(args.images) % 2).astype(np.float32)
    print(
        f"VGG16, {args.images} images of {args.image_size} px, batch {args.batch_size}, "
        f"{args.epochs} epoch(s) per setting; os.cpu_count() = {os.cpu_count()}"
    )
    rows = []
    for freeze in args.freeze:
        cfg = load_params(
            args.params,
            [
                f"data.image_size={args.image_size}",
                f"model.vgg16.freeze={freeze}",
                f"model.vgg16.batch_size={args.batch_size}",
                *args.overrides,
            ],
        )
        plain = time_plain(cfg, images, labels, args.epochs)
        with tempfile.TemporaryDirectory() as cache_dir:
            cached, build, mode = time_cached(cfg, images, labels, args.epochs, Path(cache_dir))
        rows.append((f"freeze={freeze}", plain, cached, build, plain / cached, mode))
        print(f"  done: freeze={freeze}", flush=True)

    header = ("setting", "s/epoch plain", "s/epoch cached", "cache build s", "speed-up", "cache")
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for setting, plain, cached, build, speedup, mode in rows:
        print(f"| {setting} | {plain:.2f} | {cached:.3f} | {build:.2f} | {speedup:.1f}x | {mode} |")


if __name__ == "__main__":
    main()
