"""How often the out-of-distribution guard flags real test photos and clearly non-skin images.

For one stored model (its guard fitted at publish), prints the share of the held-out test
photos flagged (goal: at most 5%) and of each kind of non-skin image
(``pox_pipeline.guard.non_skin``: flat colours, noise, text screenshots, charts, photos of objects
and animals; goal: at least 95%): by each feature space of the guard alone (the model's head
features; the photo's colour/texture statistics) and by the served rule (flagged by any),
which goes through the service's own Predictor. Without a guard, nothing is flagged.

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

from pox_pipeline.common import preprocess
from pox_pipeline.guard import non_skin, ood
from pox_pipeline.serving.scoring import Predictor, split_ood_score

TEST_GOAL, NON_SKIN_GOAL = 0.05, 0.95
BATCH = 32
SERVED = "the served rule (any space)"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bento-tag", default="pox-classifier:latest",
                        help="model in the BentoML store (default: %(default)s)")  # fmt: skip
    parser.add_argument("--images", type=Path, default=Path("datas/prepared/test"),
                        help="held-out photos, any depth (default: %(default)s)")  # fmt: skip
    return parser.parse_args(argv)


def flagged(predictor: Predictor, photos: list[Image.Image]) -> dict[str, np.ndarray]:
    """Per photo, whether each feature space alone flags it, and the served rule (any space),
    through the service's own preprocessing and Predictor, in batches of 32."""
    policy, guard = predictor.policy, predictor.guard
    inputs = np.stack(
        [preprocess.to_model_input(p, policy.image_size, policy.resample) for p in photos]
    )
    served = np.concatenate(
        [split_ood_score(predictor.outputs_with_ood_score(inputs[i : i + BATCH]))[1]
         for i in tqdm(range(0, len(inputs), BATCH), desc="photos", disable=None, leave=False)]
    )  # fmt: skip
    spaces = tuple(dict.fromkeys(ood.space_of(key) for key in guard.guards))
    settings = ood.OODSettings(spaces=spaces, statistics_size=guard.statistics_size, k=1,
                               alpha=0.01, batch_size=BATCH)  # fmt: skip
    features = ood.features_of(predictor.model, inputs, settings, policy.tta)
    alone = {key: part.ratios(features[ood.space_of(key)]) > 1.0
             for key, part in guard.guards.items()}  # fmt: skip
    return {**alone, SERVED: served > 1.0}


def rates(predictor: Predictor, test_dir: Path) -> list[tuple[str, int, dict[str, int], str]]:
    """(set, images, {rule: flagged}, goal) rows: the test photos, each non-skin kind, all."""
    files = preprocess.photo_files(test_dir)
    if not files:
        raise SystemExit(f"no photos under {test_dir}")
    test = flagged(predictor, [preprocess.decode_image(p.read_bytes()) for p in files])
    test_hits = {rule: int(hits.sum()) for rule, hits in test.items()}
    rows = [(f"held-out test photos ({test_dir})", len(files), test_hits, f"<= {TEST_GOAL:.0%}")]
    by_kind: dict[str, list[Image.Image]] = defaultdict(list)
    for kind, _, image in non_skin.images():
        by_kind[kind].append(image)
    totals: dict[str, int] = defaultdict(int)
    for kind, images in by_kind.items():
        hits = {rule: int(values.sum()) for rule, values in flagged(predictor, images).items()}
        rows.append((f"  {kind}", len(images), hits, ""))
        for rule, count in hits.items():
            totals[rule] += count
    count = sum(len(images) for images in by_kind.values())
    rows.append(("clearly non-skin images, all", count, dict(totals), f">= {NON_SKIN_GOAL:.0%}"))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    import bentoml

    stored = bentoml.models.get(args.bento_tag)
    predictor = Predictor.from_stored(stored)
    if predictor.guard is None:
        raise SystemExit(f"{stored.tag} has no out-of-distribution guard: publish it again")
    spaces = ", ".join(
        f"{space} (k={guard.k}, threshold {guard.threshold:.3f}, set on "
        f"{guard.calibration_photos} held-out photos for at most {guard.effective_alpha:.2%})"
        for space, guard in predictor.guard.guards.items()
    )
    print(f"model {stored.tag} ({stored.info.metadata.get('model_name')}), guard spaces: {spaces}")
    print(f"stated false-refusal rate of genuine photos: at most {predictor.guard.stated_rate:.2%}")
    rules = [*predictor.guard.guards, SERVED]
    print("| set | images | " + " | ".join(f"flagged by {rule}" for rule in rules) + " | goal |")
    print("|---|---|" + "---|" * len(rules) + "---|")
    for name, count, hits, goal in rates(predictor, args.images):
        cells = " | ".join(f"{hits[rule]} ({hits[rule] / count:.1%}, {interval(hits[rule], count)})"
                           for rule in rules)  # fmt: skip
        print(f"| {name} | {count} | {cells} | {goal} |")


def interval(hits: int, count: int) -> str:
    """The exact (Clopper-Pearson) 95% interval of a flagged share."""
    from scipy.stats import binomtest

    ci = binomtest(hits, count).proportion_ci(confidence_level=0.95)
    return f"95% CI {ci.low:.1%}-{ci.high:.1%}"


if __name__ == "__main__":
    main()
