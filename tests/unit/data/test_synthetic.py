"""The synthetic data set: deterministic, named like MSLD, clean rewrite, classes separable."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig
from PIL import Image

from pox_pipeline.data.synthetic import README_NAME, synthesize


def _digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_same_seed_gives_identical_bytes_and_other_seed_differs(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    first = _digests(synthesize(make_cfg(f"synthetic.out_dir={tmp_path}/a")))
    again = _digests(synthesize(make_cfg(f"synthetic.out_dir={tmp_path}/b")))
    other = _digests(synthesize(make_cfg(f"synthetic.out_dir={tmp_path}/c", "seed=7")))
    assert first == again
    assert first != other


def test_counts_names_and_format(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg("synthetic.patients_per_class=5", "synthetic.images_per_patient=[2,3]")
    out = synthesize(cfg)
    assert "synthetic" in (out / README_NAME).read_text().lower()
    group = re.compile(cfg.data.group_pattern)
    for class_name, prefix in zip(cfg.data.classes, cfg.synthetic.id_prefixes, strict=True):
        files = sorted((out / class_name).iterdir())
        patients = {group.search(f.stem).group(1) for f in files}
        assert patients == {f"{prefix}{n:02d}" for n in range(1, 6)}
        assert all(re.fullmatch(rf"{prefix}\d\d_\d\d\.png", f.name) for f in files)
        per_patient = [sum(f.name.startswith(f"{p}_") for f in files) for p in patients]
        assert min(per_patient) >= 2 and max(per_patient) <= 3
        with Image.open(files[0]) as image:
            assert image.mode == "RGB"
            assert image.size == (cfg.synthetic.image_size,) * 2


def test_rerun_replaces_its_own_folder_but_refuses_foreign_ones(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = make_cfg()
    out = synthesize(cfg)
    stale = out / cfg.data.classes[0] / "STALE99_01.png"
    stale.write_bytes(b"old")
    synthesize(cfg)
    assert not stale.exists()

    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("do not delete")
    with pytest.raises(FileExistsError, match="refusing"):
        synthesize(make_cfg(f"synthetic.out_dir={foreign}"))
    assert (foreign / "thesis.txt").exists()


def test_patients_look_alike_and_classes_differ(make_cfg: Callable[..., DictConfig]) -> None:
    """Images of one patient are closer than images of different patients, and the two
    lesion styles differ in the way a CNN can see (pale-centred pustules are brighter)."""
    cfg = make_cfg("synthetic.images_per_patient=[2,2]", "synthetic.style_overlap=0")
    out = synthesize(cfg)

    def pixels(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path), dtype=np.float64)

    same, different = [], []
    for class_name in cfg.data.classes:
        files = sorted((out / class_name).iterdir())
        pairs = list(zip(files[::2], files[1::2], strict=True))
        for (a, b), (c, _) in zip(pairs, pairs[1:] + pairs[:1], strict=True):
            same.append(np.abs(pixels(a) - pixels(b)).mean())
            different.append(np.abs(pixels(a) - pixels(c)).mean())
    assert np.median(same) < np.median(different)

    def lesion_brightness(class_name: str) -> float:
        """Mean of the brightest 2% of pixels relative to the image median (the skin)."""
        values = []
        for path in sorted((out / class_name).iterdir()):
            grey = pixels(path).mean(axis=2)
            values.append(np.percentile(grey, 98) - np.median(grey))
        return float(np.mean(values))

    pustules, rash = (lesion_brightness(c) for c in cfg.data.classes)
    assert pustules > rash + 10
