"""How often the out-of-distribution guard flags real test photos and clearly non-skin images.

For one stored model (its guard fitted at publish), prints the share of the held-out test
photos flagged (goal: at most 5%) and of each kind of non-skin image
(``pox_pipeline.non_skin``: flat colours, noise, text screenshots, charts, photos of objects
and animals; goal: at least 95%), next to the no-guard baseline (nothing flagged), measured
in the same run through the service's own Predictor.

examples:
  python benchmarks/ood_rates.py                          # champion, the prepared test split
  python benchmarks/ood_rates.py --bento-tag pox-classifier:latest --images datas/prepared/test
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pox_pipeline import non_skin, preprocess
from pox_pipeline.config import PROJECT_ROOT
from pox_pipeline.serve import Predictor, split_distance

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
TEST_GOAL, NON_SKIN_GOAL = 0.05, 0.95


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bento-tag", default="pox-classifier:latest",
                        help="model in the BentoML store (default: %(default)s)")  # fmt: skip
    parser.add_argument("--images", type=Path, default=PROJECT_ROOT / "datas/prepared/test",
                        help="held-out photos, any depth (default: the prepared test split)")  # fmt: skip
    return parser.parse_args(argv)


def flagged(predictor: Predictor, photos: list[Image.Image]) -> np.ndarray:
    """True for each photo the guard flags (the model's own preprocessing, in batches of 32)."""
    card = predictor.card
    inputs = np.stack([preprocess.to_model_input(p, card.image_size, card.resample) for p in photos])
    distances = np.concatenate(
        [split_distance(predictor.outputs_with_distance(inputs[i : i + 32]))[1]
         for i in tqdm(range(0, len(inputs), 32), desc="batches", disable=None, leave=False)]
    )  # fmt: skip
    if np.isnan(distances).any():
        raise SystemExit("this model has no out-of-distribution guard: publish it again")
    return distances > predictor.guard.threshold


def rates(predictor: Predictor, test_dir: Path) -> list[tuple[str, int, int, str]]:
    """(set, images, flagged, goal) rows: the test photos, each non-skin kind, all non-skin."""
    files = sorted(p for p in test_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"no photos under {test_dir}")
    test = flagged(predictor, [preprocess.decode_image(p.read_bytes()) for p in files])
    rows = [(f"held-out test photos ({test_dir.name})", len(files), int(test.sum()),
             f"<= {TEST_GOAL:.0%}")]  # fmt: skip
    by_kind: dict[str, list[Image.Image]] = defaultdict(list)
    for kind, _, image in non_skin.images():
        by_kind[kind].append(image)
    total = [0, 0]
    for kind, images in by_kind.items():
        hits = int(flagged(predictor, images).sum())
        rows.append((f"  {kind}", len(images), hits, ""))
        total = [total[0] + len(images), total[1] + hits]
    rows.append(("clearly non-skin images, all", total[0], total[1], f">= {NON_SKIN_GOAL:.0%}"))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    import bentoml

    stored = bentoml.models.get(args.bento_tag)
    predictor = Predictor.from_stored(stored)
    if predictor.guard is None:
        raise SystemExit(f"{stored.tag} has no out-of-distribution guard: publish it again")
    print(f"model {stored.tag} ({stored.info.metadata.get('model_name')}), guard "
          f"k={predictor.guard.k}, threshold {predictor.guard.threshold:.3f} "
          f"(validation quantile {predictor.guard.quantile})")  # fmt: skip
    print(f"| set | images | flagged | rate | no-guard baseline | goal |\n|---|---|---|---|---|---|")
    for name, count, hits, goal in rates(predictor, args.images):
        print(f"| {name} | {count} | {hits} | {hits / count:.1%} | 0.0% | {goal} |")


if __name__ == "__main__":
    main()
