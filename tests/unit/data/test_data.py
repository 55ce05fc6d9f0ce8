"""The prepare stage: messy inputs, duplicates, leak-free grouped splits, k-fold, presplit
layouts, the file contracts, and `load_split`."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig
from PIL import Image, ImageEnhance

from helpers.suite import MSLD_DIR, requires_msld, tmp_overrides
from pox_pipeline.common.config import compose, write_params
from pox_pipeline.common.preprocess import preprocess_file
from pox_pipeline.data.prepare import (
    MANIFEST_COLUMNS,
    SPLITS,
    DataError,
    ImageRecord,
    check_no_leaks,
    load_split,
    merge_groups,
    prepare,
    split_groups,
)

REPORT_KEYS = {
    "layout", "raw_dir", "classes", "folds", "fold", "seed", "split", "image_size", "group_pattern",
    "totals", "counts", "groups", "dropped", "skipped", "ungrouped_files", "duplicates",
    "near_duplicates", "merged_groups", "label_conflicts", "leaks_between_given_splits",
    "collections", "cross_collection_pairs",
}


def _manifest(cfg: DictConfig) -> list[dict[str, str]]:
    with (Path(cfg.paths.prepared_dir) / "manifest.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _report(cfg: DictConfig) -> dict:
    return json.loads((Path(cfg.paths.reports_dir) / "data" / "report.json").read_text())


def _splits_by(rows: list[dict[str, str]], key: Callable[[dict[str, str]], str]) -> dict:
    found: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        found[key(row)].add(row["split"])
    return found


def _patient(row: dict[str, str], pattern: str = r"^([A-Za-z]+\d+)_") -> str:
    return re.match(pattern, Path(row["source"]).stem).group(1)


def _texture(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A smooth random colour texture: distinct per seed, with detail that survives JPEG."""
    coarse = np.random.default_rng(seed).integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def _jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


# ------------------------------------------------------------------ the synthetic data set


@pytest.fixture(scope="module")
def prepared(prepared_root: Path) -> DictConfig:
    return compose(tmp_overrides(prepared_root))


def test_prepared_synthetic_set_is_leak_free_stratified_and_follows_the_contract(
    prepared: DictConfig,
) -> None:
    rows = _manifest(prepared)
    report = _report(prepared)
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    assert REPORT_KEYS <= set(report)

    assert all(len(s) == 1 for s in _splits_by(rows, lambda r: r["group"]).values())
    assert all(len(s) == 1 for s in _splits_by(rows, _patient).values())

    classes = list(prepared.data.classes)
    counts = report["counts"]
    for split in SPLITS:
        for class_name in classes:
            n = sum(r["split"] == split and r["class"] == class_name for r in rows)
            assert n == counts[split][class_name] > 0, (split, class_name)
    for class_name in classes:
        total = report["totals"][class_name]
        train_share = counts["train"][class_name] / total
        assert abs(train_share - prepared.data.split.train) < 0.2
    assert report["totals"]["images"] == len(rows)
    assert report["totals"]["dropped"] == 0

    prepared_dir = Path(prepared.paths.prepared_dir)
    for row in rows[:: max(1, len(rows) // 5)]:
        assert row["file"] == f"{row['split']}/{row['class']}/{Path(row['source']).stem}.png"
        with Image.open(prepared_dir / row["file"]) as image:
            assert image.format == "PNG" and image.mode == "RGB"
            assert image.size == (prepared.data.image_size,) * 2
        assert hashlib.sha256(Path(row["source"]).read_bytes()).hexdigest() == row["sha256"]

    samples = Path(prepared.paths.reports_dir) / "data" / "samples.png"
    assert samples.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(samples) as grid:
        assert grid.width > grid.height  # 4 columns x 3 rows


def test_load_split_matches_manifest_and_preprocess_file(prepared: DictConfig) -> None:
    size = prepared.data.image_size
    rows = [r for r in _manifest(prepared) if r["split"] == "val"]
    images, labels, paths = load_split(prepared, "val")
    assert images.shape == (len(rows), size, size, 3) and images.dtype == np.float32
    assert labels.tolist() == [prepared.data.classes.index(r["class"]) for r in rows]
    assert [Path(p) for p in paths] == [Path(prepared.paths.prepared_dir) / r["file"] for r in rows]
    np.testing.assert_array_equal(
        images[-1], preprocess_file(paths[-1], size, prepared.data.resample)
    )
    with pytest.raises(ValueError, match="unknown split"):
        load_split(prepared, "training")


def test_split_is_seeded(
    make_cfg: Callable[..., DictConfig], prepared_root: Path, prepared: DictConfig
) -> None:
    raw = f"data.raw_dir={prepared_root}/datas/synthetic"
    same = make_cfg(raw)
    prepare(same)
    assert _manifest(same) == _manifest(prepared)
    other = make_cfg(raw, "seed=1", f"paths.prepared_dir={same.paths.prepared_dir}-seed1")
    prepare(other)
    assignment = {r["group"]: r["split"] for r in _manifest(same)}
    assert assignment != {r["group"]: r["split"] for r in _manifest(other)}


def test_kfold_every_group_is_test_exactly_once(
    make_cfg: Callable[..., DictConfig], prepared_root: Path
) -> None:
    test_folds: dict[str, list[int]] = defaultdict(list)
    all_groups: set[str] = set()
    for fold in range(3):
        cfg = make_cfg(
            f"data.raw_dir={prepared_root}/datas/synthetic", "data.folds=3", f"data.fold={fold}",
            f"paths.prepared_dir={make_cfg().paths.prepared_dir}-{fold}",
        )
        report = prepare(cfg)
        assert (report["folds"], report["fold"]) == (3, fold)
        rows = _manifest(cfg)
        by_group = _splits_by(rows, lambda r: r["group"])
        assert all(len(s) == 1 for s in by_group.values()), "a group in two splits"
        assert {r["split"] for r in rows} == set(SPLITS)
        for group, splits in by_group.items():
            all_groups.add(group)
            if splits == {"test"}:
                test_folds[group].append(fold)
    assert set(test_folds) == all_groups
    assert all(len(folds) == 1 for folds in test_folds.values())
    with pytest.raises(DataError, match="data.fold"):
        prepare(make_cfg("data.folds=3", "data.fold=3"))


# ------------------------------------------------------------------ messy real-world folders


@pytest.fixture
def messy_raw(tmp_path: Path) -> Path:
    """Two class folders with good photos, odd-but-valid formats, broken files, duplicates."""
    raw = tmp_path / "raw"
    pox, others = raw / "Monkeypox", raw / "Others"
    pox.mkdir(parents=True)
    others.mkdir()
    for patient in range(1, 7):
        for shot in (1, 2):
            _texture(100 * patient + shot).save(pox / f"P{patient:02d}_{shot:02d}.png")
            _texture(10_000 + 100 * patient + shot).save(others / f"Q{patient:02d}_{shot:02d}.png")

    # broken: not an image, truncated, empty
    (pox / "B01_01.jpg").write_text("this is a text file, not a JPEG")
    jpeg = _jpeg_bytes(_texture(1))
    (pox / "B02_01.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (others / "B03_01.jpg").write_bytes(b"")

    # odd but valid
    sixteen = np.full((20, 30), 32768, dtype=np.uint16)
    Image.fromarray(sixteen).save(pox / "G01_01.png")
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(pox / "G02_01.jpg")  # red in CMYK
    Image.new("RGBA", (30, 20), (0, 0, 255, 0)).save(others / "G03_01.png")  # transparent
    palette = Image.new("RGB", (30, 20), (0, 255, 0)).convert("P", palette=Image.ADAPTIVE)
    palette.save(others / "G04_01.gif")
    rotated = Image.new("RGB", (40, 20), (0, 0, 255))
    rotated.paste((255, 0, 0), (0, 0, 20, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: left becomes top
    rotated.save(pox / "G05_01.jpg", exif=exif.tobytes(), quality=95)

    # duplicates under other patient ids: same bytes; re-encoded + brighter; mirrored;
    # and the same photo in the other class (a label conflict)
    (pox / "D01_01.png").write_bytes((pox / "P01_01.png").read_bytes())
    brighter = ImageEnhance.Brightness(Image.open(pox / "P02_01.png")).enhance(1.1)
    (pox / "D02_01.jpg").write_bytes(_jpeg_bytes(brighter, quality=80))
    Image.open(others / "Q03_01.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        others / "D03_01.png"
    )
    (others / "D04_01.png").write_bytes((pox / "P04_02.png").read_bytes())

    # a second P05_01 in a subfolder: its output name must not collide
    (pox / "more").mkdir()
    _texture(777).save(pox / "more" / "P05_01.png")

    # skipped: hidden files, foreign extensions, stray files beside the class folders
    (pox / ".DS_Store").write_bytes(b"\x00\x01")
    (others / "notes.txt").write_text("lesion notes")
    (raw / "README.md").write_text("about this data")
    return raw


def test_messy_folder_reports_bad_files_and_keeps_odd_valid_ones(
    make_cfg: Callable[..., DictConfig], messy_raw: Path
) -> None:
    cfg = make_cfg(f"data.raw_dir={messy_raw}")
    report = prepare(cfg)

    dropped = {Path(d["file"]).name: d["reason"] for d in report["dropped"]}
    assert set(dropped) == {"B01_01.jpg", "B02_01.jpg", "B03_01.jpg"}
    assert "not an image" in dropped["B01_01.jpg"]
    assert "could not be decoded" in dropped["B02_01.jpg"]
    assert "empty" in dropped["B03_01.jpg"]
    skipped = {Path(s["file"]).name: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {".DS_Store", "notes.txt", "README.md"}
    assert "hidden" in skipped[".DS_Store"] and "extension" in skipped["notes.txt"]

    manifest = _manifest(cfg)
    assert report["totals"]["images"] == len(manifest) == 12 * 2 + 5 + 4 + 1
    files = [r["file"] for r in manifest]
    assert len(set(files)) == len(files)
    nested = next(r for r in manifest if r["source"].endswith("more/P05_01.png"))
    assert nested["file"].endswith("/P05_01-2.png")
    rows = {Path(r["source"]).name: r for r in manifest if "more" not in r["source"]}
    prepared_dir = Path(cfg.paths.prepared_dir)

    def pixels(name: str) -> np.ndarray:
        return np.asarray(Image.open(prepared_dir / rows[name]["file"]), dtype=np.int16)

    np.testing.assert_allclose(pixels("G01_01.png"), 128, atol=1)  # 16-bit mid grey
    assert np.allclose(pixels("G02_01.jpg"), [255, 0, 0], atol=40)  # CMYK red
    np.testing.assert_array_equal(pixels("G03_01.png"), 255)  # transparent -> white
    assert np.allclose(pixels("G04_01.gif"), [0, 255, 0], atol=2)  # palette green
    upright = pixels("G05_01.jpg")
    assert np.allclose(upright[2, :], [255, 0, 0], atol=40)  # EXIF applied: red on top
    assert np.allclose(upright[-3, :], [0, 0, 255], atol=40)


def test_duplicates_are_reported_and_kept_in_one_split(
    make_cfg: Callable[..., DictConfig], messy_raw: Path
) -> None:
    cfg = make_cfg(f"data.raw_dir={messy_raw}")
    report = prepare(cfg)
    rows = {Path(r["source"]).name: r for r in _manifest(cfg)}
    exact = {frozenset(Path(p[k]).name for k in "ab"): p for p in report["duplicates"]}
    near = {frozenset(Path(p[k]).name for k in "ab"): p for p in report["near_duplicates"]}

    assert exact[frozenset({"P01_01.png", "D01_01.png"})]["kind"] == "identical bytes"
    assert frozenset({"P04_02.png", "D04_01.png"}) in exact
    assert near[frozenset({"P02_01.png", "D02_01.jpg"})]["similarity"] >= 0.95  # re-encoded
    assert frozenset({"Q03_01.png", "D03_01.png"}) in near  # mirrored
    assert len(near) == 2, f"unexpected near duplicates: {list(near)}"
    conflicts = {frozenset(Path(p[k]).name for k in "ab") for p in report["label_conflicts"]}
    assert conflicts == {frozenset({"P04_02.png", "D04_01.png"})}

    pairs = [("P01_01.png", "D01_01.png", "P01_02.png"), ("P02_01.png", "D02_01.jpg", "P02_02.png"),
             ("Q03_01.png", "D03_01.png", "Q03_02.png"), ("P04_02.png", "D04_01.png", "P04_01.png")]
    for original, copy, sibling in pairs:
        assert rows[original]["group"] == rows[copy]["group"]
        assert rows[original]["split"] == rows[copy]["split"]
        assert rows[sibling]["split"] == rows[copy]["split"]  # the patient follows its copy
    assert ["D01", "P01"] in report["merged_groups"]


@pytest.fixture
def two_collections(tmp_path: Path) -> Path:
    """clinic_a: patient ids, class folders named as the classes; clinic_b: no ids, its own
    folder names, a folder left out, and two photos that are clinic_a's (one mirrored)."""
    root = tmp_path / "collections"
    for class_name, offset in (("Monkeypox", 0), ("Others", 500)):
        folder = root / "clinic_a" / class_name
        folder.mkdir(parents=True)
        for patient in range(6):
            for photo in range(2):
                _texture(offset + 10 * patient + photo).save(folder / f"A{patient:02d}_{photo}.png")
    for folder_name, offset in (("pox", 1000), ("chickenpox", 2000), ("healthy", 3000)):
        folder = root / "clinic_b" / folder_name
        folder.mkdir(parents=True)
        for photo in range(8):
            _texture(offset + photo).save(folder / f"{folder_name}{photo}.png")
    a = root / "clinic_a" / "Monkeypox"
    (root / "clinic_b" / "pox" / "copied.png").write_bytes((a / "A01_0.png").read_bytes())
    Image.open(a / "A02_1.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        root / "clinic_b" / "pox" / "mirrored.png"
    )
    return root


def test_several_collections_are_one_leak_free_set_with_their_names(
    make_cfg: Callable[..., DictConfig], two_collections: Path
) -> None:
    cfg = make_cfg(
        f"data.raw_dir={two_collections}",
        "+data.sources.clinic_a={dir: clinic_a}",
        "+data.sources.clinic_b={dir: clinic_b, group_pattern: null, class_map: "
        "{pox: Monkeypox, chickenpox: Others, healthy: null}}",
    )
    report = prepare(cfg)
    rows = _manifest(cfg)
    assert report["collections"] == {"clinic_a": {"Monkeypox": 12, "Others": 12},
                                     "clinic_b": {"Monkeypox": 10, "Others": 8}}  # fmt: skip
    assert not any("healthy" in r["source"] for r in rows)  # left out by its class map
    assert not any("healthy" in s["file"] for s in report["skipped"])
    by_name = {Path(r["source"]).name: r for r in rows}
    assert {r["collection"] for r in rows} == {"clinic_a", "clinic_b"}
    assert by_name["A01_1.png"]["group"].startswith("clinic_a:A01")  # ids keep their collection
    assert by_name["chickenpox3.png"]["group"] == "clinic_b:chickenpox/chickenpox3"
    assert by_name["chickenpox3.png"]["class"] == "Others"

    crossing = {frozenset(Path(p[k]).name for k in "ab") for p in report["cross_collection_pairs"]}
    assert crossing == {frozenset({"A01_0.png", "copied.png"}),
                        frozenset({"A02_1.png", "mirrored.png"})}  # fmt: skip
    for original, copy, sibling in (("A01_0.png", "copied.png", "A01_1.png"),
                                    ("A02_1.png", "mirrored.png", "A02_0.png")):  # fmt: skip
        assert by_name[original]["group"] == by_name[copy]["group"]
        assert by_name[sibling]["split"] == by_name[copy]["split"]
    assert all(len(s) == 1 for s in _splits_by(rows, lambda r: r["group"]).values())
    for collection in ("clinic_a", "clinic_b"):  # stratified by collection and class
        assert {r["split"] for r in rows if r["collection"] == collection} == set(SPLITS)


def test_a_bad_collection_entry_is_a_clear_error(
    make_cfg: Callable[..., DictConfig], two_collections: Path
) -> None:
    raw = f"data.raw_dir={two_collections}"
    with pytest.raises(DataError, match="not in data.classes"):
        prepare(make_cfg(raw, "+data.sources.b={dir: clinic_b, class_map: {pox: Pox}}"))
    with pytest.raises(DataError, match="expected keys dir"):
        prepare(make_cfg(raw, "+data.sources.b={folder: clinic_b}"))
    with pytest.raises(DataError, match=r"data.sources.b: .*missing does not exist"):
        prepare(make_cfg(raw, "+data.sources.b={dir: missing}"))
    with pytest.raises(DataError, match=r"missing \['Monkeypox', 'Others'\]"):
        prepare(make_cfg(raw, "+data.sources.b={dir: clinic_b}"))


def test_strict_mode_fails_with_the_list_of_bad_files(
    make_cfg: Callable[..., DictConfig], messy_raw: Path
) -> None:
    cfg = make_cfg(f"data.raw_dir={messy_raw}", "data.strict=true")
    with pytest.raises(DataError) as caught:
        prepare(cfg)
    message = str(caught.value)
    assert "3 unreadable" in message
    assert all(name in message for name in ("B01_01.jpg", "B02_01.jpg", "B03_01.jpg"))
    assert not Path(cfg.paths.prepared_dir).exists()


def test_entry_point_exits_non_zero_with_a_clean_message(messy_raw: Path, tmp_path: Path) -> None:
    """`python -m pox_pipeline.data.prepare` as DVC runs it: strict failure -> exit 1, no
    traceback."""
    overrides = [*tmp_overrides(tmp_path), f"data.raw_dir={messy_raw}", "data.strict=true"]
    write_params(tmp_path / "params.yaml", overrides=overrides)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # the project a stage runs in
    result = subprocess.run(
        [sys.executable, "-m", "pox_pipeline.data.prepare"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert "prepare failed: 3 unreadable image(s)" in result.stderr
    assert "B02_01.jpg" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_class_folder_and_empty_data_set_are_clear_errors(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    raw = tmp_path / "raw"
    (raw / "Monkeypox").mkdir(parents=True)
    (raw / "others").mkdir()
    expected = r"missing \['Others'\], found folders \['Monkeypox', 'others'\]"
    with pytest.raises(DataError, match=expected):
        prepare(make_cfg(f"data.raw_dir={raw}"))
    (raw / "Others").mkdir()
    (raw / "Others" / "x.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"no usable images for class\(es\) \['Monkeypox', 'Oth"):
        prepare(make_cfg(f"data.raw_dir={raw}"))
    with pytest.raises(DataError, match="does not exist"):
        prepare(make_cfg(f"data.raw_dir={tmp_path / 'nowhere'}"))


def test_refuses_to_replace_a_folder_it_did_not_write(
    make_cfg: Callable[..., DictConfig], messy_raw: Path, tmp_path: Path
) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing"):
        prepare(make_cfg(f"data.raw_dir={messy_raw}", f"paths.prepared_dir={precious}"))
    assert (precious / "thesis.txt").exists()


def test_presplit_layout_keeps_splits_and_reports_leaks(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    raw = tmp_path / "raw"
    seed = 0
    for folder in ("Train", "Val", "Test"):
        for class_name, prefix in (("Monkeypox", "M"), ("Others", "N")):
            target = raw / folder / class_name
            target.mkdir(parents=True)
            for patient in range(2):
                seed += 1
                _texture(seed).save(target / f"{prefix}{folder}{patient}_01.png")
    # the same patient in Train and Test, and one photo copied from Train into Val
    _texture(999).save(raw / "Train" / "Monkeypox" / "M77_01.png")
    _texture(998).save(raw / "Test" / "Monkeypox" / "M77_02.png")
    copy = raw / "Val" / "Others" / "N88_01.png"
    copy.write_bytes((raw / "Train" / "Others" / "NTrain0_01.png").read_bytes())

    cfg = make_cfg(f"data.raw_dir={raw}", "data.layout=presplit")
    report = prepare(cfg)
    rows = _manifest(cfg)
    given = {"Train": "train", "Val": "val", "Test": "test"}
    assert all(r["split"] == given[Path(r["source"]).parts[-3]] for r in rows)
    assert report["counts"]["val"]["total"] == 5
    leaks = {leak["group"]: leak["splits"] for leak in report["leaks_between_given_splits"]}
    assert leaks == {"M77": ["train", "test"], "N88+NTrain0": ["train", "val"]}

    (raw / "Val").rename(raw / "Validation")
    with pytest.raises(DataError, match="missing"):
        prepare(cfg)


# ------------------------------------------------------------------ the pieces


def test_split_groups_follows_ratios_per_class_and_fills_every_split() -> None:
    rng = np.random.default_rng(0)
    group_class = {f"g{i}": i % 2 for i in range(200)}
    group_size = {g: 1 + i % 4 for i, g in enumerate(group_class)}
    ratios = {"train": 0.7, "val": 0.1, "test": 0.2}
    assignment = split_groups(group_class, group_size, ratios, rng)
    for class_index in (0, 1):
        groups = [g for g, c in group_class.items() if c == class_index]
        total = sum(group_size[g] for g in groups)
        for split, ratio in ratios.items():
            share = sum(group_size[g] for g in groups if assignment[g] == split) / total
            assert abs(share - ratio) < 0.02, (class_index, split, share)
    tiny = split_groups({"a": 0, "b": 0, "c": 0}, dict.fromkeys("abc", 1), ratios, rng)
    assert sorted(tiny.values()) == sorted(SPLITS)


def test_merge_groups_and_leak_check() -> None:
    merged = merge_groups(["A", "B", "C", "D"], [("B", "C"), ("C", "D")])
    assert merged == {"A": "A", "B": "B+C+D", "C": "B+C+D", "D": "B+C+D"}

    def record(group: str, split: str) -> ImageRecord:
        return ImageRecord(
            source=Path(f"{group}.png"), class_name="x", given_split=None, sha256="",
            pixel_sha256="", detail=np.zeros(1), staged=Path(), patient=group, group=group,
            split=split,
        )

    assert check_no_leaks([record("A", "train"), record("B", "test")]) == []
    leaks = check_no_leaks([record("A", "train"), record("A", "test"), record("B", "val")])
    assert leaks == [{"group": "A", "splits": ["train", "test"]}]


# ------------------------------------------------------------------ the real data set


@requires_msld
def test_msld_split_is_patient_independent_and_balanced(
    make_cfg: Callable[..., DictConfig],
) -> None:
    cfg = make_cfg("data=msld", f"data.raw_dir={MSLD_DIR}")
    report = prepare(cfg)
    rows = _manifest(cfg)
    assert report["totals"]["images"] == len(rows) == 228
    assert report["totals"]["dropped"] == 0 and report["ungrouped_files"] == []
    assert all(len(s) == 1 for s in _splits_by(rows, lambda r: _patient(r, r"^(N?M\d+)_")).values())
    overall = sum(r["class"] == "Monkeypox" for r in rows) / len(rows)
    for split in SPLITS:
        in_split = [r for r in rows if r["split"] == split]
        share = sum(r["class"] == "Monkeypox" for r in in_split) / len(in_split)
        assert abs(share - overall) < 0.1, (split, share, overall)
        assert abs(len(in_split) / len(rows) - cfg.data.split[split]) < 0.05


@requires_msld
def test_msld_and_msid_are_one_leak_free_set_of_two_collections(
    make_cfg: Callable[..., DictConfig],
) -> None:
    cfg = make_cfg("data=msld_msid", f"data.raw_dir={MSLD_DIR.parent}")
    report = prepare(cfg)
    rows = _manifest(cfg)
    assert report["collections"] == {"msld": {"Monkeypox": 102, "Others": 126},
                                     "msid": {"Monkeypox": 191, "Others": 430}}  # fmt: skip
    assert len(rows) == 849 and report["totals"]["dropped"] == 0
    assert {Path(s["file"]).name for s in report["skipped"]} == {"MANIFEST.md"}
    assert all(len(s) == 1 for s in _splits_by(rows, lambda r: r["group"]).values())
    for collection in ("msld", "msid"):  # each collection in every split, in proportion
        mine = [r for r in rows if r["collection"] == collection]
        for split in SPLITS:
            share = sum(r["split"] == split for r in mine) / len(mine)
            assert abs(share - cfg.data.split[split]) < 0.06, (collection, split, share)
    for pair in report["cross_collection_pairs"]:  # a photo in both: one group, one split
        groups = {r["group"] for r in rows if r["source"] in (pair["a"], pair["b"])}
        assert len(groups) == 1


def _phone_jpeg(size: tuple[int, int] = (1200, 900), orientation: int = 6) -> bytes:
    """A large JPEG with an EXIF orientation, as phones write them (at a test's size)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _jpeg_bytes(_texture(4242, size), quality=90, exif=exif.tobytes())


def test_a_jpeg_is_shrunk_as_it_is_decoded_and_turned_upright() -> None:
    """DCT scaling: the smallest 1/2, 1/4, 1/8 scale whose sides cover the model's input."""
    from pox_pipeline.common.preprocess import decode_image

    full = decode_image(_phone_jpeg())
    assert full.size == (900, 1200)  # orientation 6: a portrait photo
    drafted = decode_image(_phone_jpeg(), draft=200)
    assert drafted.size == (225, 300) and drafted.mode == "RGB"  # 1/4 (1/8 would be 113 px)
    assert decode_image(_phone_jpeg(), draft=100).size == (113, 150)  # 1/8, rounded up
    assert decode_image(_phone_jpeg(), draft=1000).size == (900, 1200)  # no scale covers it


def test_the_served_input_of_a_photo_is_the_prepared_one(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """prepare and the service decode a photo the same way (a phone JPEG shrunk as decoded,
    EXIF orientation applied), so the model trains on exactly the pixels it is served."""
    from types import SimpleNamespace

    from pox_pipeline.serving.settings import ServeConfig
    from pox_pipeline.serving.uploads import load_upload

    raw = tmp_path / "raw"
    for label, offset in (("Monkeypox", 0), ("Others", 10_000)):
        (raw / label).mkdir(parents=True)
        for patient in range(1, 7):
            for shot in (1, 2):
                _texture(offset + 100 * patient + shot).save(
                    raw / label / f"P{offset + patient:05d}_{shot:02d}.png"
                )
    phone = _phone_jpeg()
    (raw / "Monkeypox" / "X01_01.jpg").write_bytes(phone)
    cfg = make_cfg(f"data.raw_dir={raw}")
    prepare(cfg)
    [row] = [r for r in _manifest(cfg) if r["source"].endswith("X01_01.jpg")]
    size = cfg.data.image_size
    prepared = preprocess_file(Path(cfg.paths.prepared_dir) / row["file"], size,
                               cfg.data.resample)  # fmt: skip
    upload = tmp_path / "upload"
    upload.write_bytes(phone)
    settings = ServeConfig.from_cfg(cfg.serve)
    card = SimpleNamespace(image_size=size, resample=cfg.data.resample)
    _, served = load_upload(upload, settings, card)
    assert served.dtype == np.uint8 and served.shape == (size, size, 3)
    np.testing.assert_array_equal(served.astype(np.float32), prepared)
