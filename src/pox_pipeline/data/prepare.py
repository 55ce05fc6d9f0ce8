"""The `prepare` stage: raw images -> checked, de-duplicated, leak-free splits.

Real data sets are messy: unreadable files, odd colour modes, the same photo twice under two
names, several photos of one patient. Every file is decoded through the one preprocessing path
(``preprocess.decode_image``); bad files are reported and left out (or fail the stage with
``data.strict``). Images are grouped by patient (``data.group_pattern``), exact and near
duplicates are forced into one group, and whole groups are assigned to splits, so no patient
and no duplicate is ever in two splits. Outputs follow docs/architecture.md.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from PIL import Image, ImageFilter
from tqdm import tqdm

from pox_pipeline.common import paths
from pox_pipeline.common.config import stage_entry
from pox_pipeline.common.preprocess import ImageError, decode_image, preprocess_file, resize

SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = ("file", "source", "collection", "class", "group", "split", "sha256")
REPORT_NAME = "report.json"
SAMPLES_NAME = "samples.png"
# Rows of the similarity matrix computed at once when looking for near duplicates.
SIMILARITY_CHUNK = 512


class DataError(ValueError):
    """The raw data cannot be prepared; ``str(err)`` says what was expected and found."""


@dataclass
class ImageRecord:
    """One readable raw image and everything the split needs to know about it."""

    source: Path
    class_name: str
    given_split: str | None
    sha256: str
    pixel_sha256: str
    detail: np.ndarray
    staged: Path
    patient: str
    collection: str = ""
    group: str = ""
    split: str = ""
    file: str = ""


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Collection:
    """One source of photos (``data.sources.<name>``): its folder, layout, class map and the
    rule that groups photos of one person, so whole persons stay in one split or fold."""

    name: str
    folder: Path
    layout: str
    class_map: Mapping[str, str | None]
    group_pattern: str | None


def collections(data: DictConfig) -> list[Collection]:
    """The configured collections; without ``data.sources``, ``data.raw_dir`` is the one.

    A source's ``dir`` is relative to ``data.raw_dir`` (the folder DVC tracks as prepare's
    dependency) unless absolute; ``class_map`` maps a source's class folder to a class of
    ``data.classes`` (null leaves the folder out; absent: the folders are named as the classes);
    ``group_pattern`` null means no person ids: near-duplicate clusters are the groups.
    """
    sources = data.get("sources") or {}
    folders = paths.source_dirs(data)
    if not sources:
        ((name, folder),) = folders.items()
        identity = {name: name for name in data.classes}
        return [Collection(name, folder, str(data.layout), identity, data.group_pattern)]
    found = []
    for name, source in sources.items():
        if source is None:  # `~data.sources.<name>` or null: the collection is switched off
            continue
        unknown = set(source) - {"dir", "layout", "class_map", "group_pattern"}
        if unknown or "dir" not in source:
            raise DataError(
                f"data.sources.{name}: expected keys dir, layout, class_map, group_pattern; "
                f"got {sorted(source)}"
            )
        class_map = source.get("class_map") or {c: c for c in data.classes}
        strays = sorted({c for c in class_map.values() if c is not None} - set(data.classes))
        if strays:
            raise DataError(
                f"data.sources.{name}.class_map maps to {strays}, which are not in "
                f"data.classes {list(data.classes)}"
            )
        pattern = source.get("group_pattern", data.group_pattern)
        found.append(Collection(str(name), folders[str(name)],
                                str(source.get("layout") or data.layout), dict(class_map),
                                None if pattern is None else str(pattern)))  # fmt: skip
    if not found:
        raise DataError("data.sources lists no collection")
    return found


def find_candidates(
    cfg: DictConfig,
) -> tuple[list[tuple[Path, str, str | None, Collection]], list[dict[str, str]]]:
    """(path, class, given split or None, collection) for every image file, and the skipped
    entries, over every collection."""
    candidates: list[tuple[Path, str, str | None, Collection]] = []
    skipped: list[dict[str, str]] = []
    for collection in collections(cfg.data):
        found, passed = _collection_candidates(cfg.data, collection)
        candidates += [(path, cls, split, collection) for path, cls, split in found]
        skipped += passed
    return candidates, skipped


def _collection_candidates(
    data: DictConfig, collection: Collection
) -> tuple[list[tuple[Path, str, str | None]], list[dict[str, str]]]:
    raw_dir = collection.folder
    where = "data.raw_dir" if raw_dir == Path(data.raw_dir) else f"data.sources.{collection.name}"
    if not raw_dir.is_dir():
        raise DataError(f"{where}: {raw_dir} does not exist or is not a folder")
    if collection.layout == "class_folders":
        roots = {None: raw_dir}
    elif collection.layout == "presplit":
        roots = {split: raw_dir / data.presplit_dirs[split] for split in SPLITS}
        missing = [str(path) for path in roots.values() if not path.is_dir()]
        if missing:
            raise DataError(
                f"layout presplit expects split folders {sorted(data.presplit_dirs.values())} "
                f"under {raw_dir}; missing: {missing}"
            )
    else:
        raise DataError(f"unknown layout {collection.layout!r} ({where}); use class_folders or "
                        "presplit")  # fmt: skip

    extensions = {ext.lower() for ext in data.image_extensions}
    candidates: list[tuple[Path, str, str | None]] = []
    skipped: list[dict[str, str]] = []
    expected_roots = {path.name for path in roots.values()}
    if collection.layout == "presplit":
        skipped += _unexpected_entries(raw_dir, expected_roots, "data.presplit_dirs")
    folders = {folder: cls for folder, cls in collection.class_map.items() if cls is not None}
    left_out = {folder for folder, cls in collection.class_map.items() if cls is None}
    for split, root in roots.items():
        missing = [name for name in folders if not (root / name).is_dir()]
        if missing:
            found = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise DataError(
                f"expected one folder per class of {where} {sorted(folders)} under {root}; "
                f"missing {missing}, found folders {found}"
            )
        setting = "data.classes" if where == "data.raw_dir" else f"{where}.class_map"
        skipped += [
            entry for entry in _unexpected_entries(root, set(folders), setting)
            if Path(entry["file"]).name not in left_out
        ]  # fmt: skip
        for folder, class_name in folders.items():
            for path in sorted((root / folder).rglob("*")):
                if path.is_dir():
                    continue
                relative = path.relative_to(root / folder)
                if any(part.startswith(".") for part in relative.parts):
                    skipped.append({"file": str(path), "reason": "hidden file or folder"})
                elif path.suffix.lower() not in extensions:
                    skipped.append(
                        {
                            "file": str(path),
                            "reason": f"extension {path.suffix or '(none)'!r} is not in "
                            "data.image_extensions",
                        }
                    )
                else:
                    candidates.append((path, class_name, split))
    return candidates, skipped


def _unexpected_entries(root: Path, expected: set[str], setting: str) -> list[dict[str, str]]:
    """Entries beside the expected folders: reported, never read."""
    return [
        {"file": str(path), "reason": f"not inside a folder named in {setting}"}
        for path in sorted(root.iterdir())
        if path.name not in expected
    ]


# --------------------------------------------------------------------------- reading


def detail_map(image: Image.Image, thumbnail: int, blur_radius: float) -> np.ndarray:
    """Grey thumbnail minus its blur: fine structure that survives re-encoding and resizing,
    without the smooth lighting gradients that make unrelated skin photos look alike."""
    grey = image.convert("L").resize((thumbnail, thumbnail), Image.Resampling.BILINEAR)
    blurred = grey.filter(ImageFilter.GaussianBlur(blur_radius))
    return np.asarray(grey, dtype=np.float32) - np.asarray(blurred, dtype=np.float32)


def patient_of(stem: str, pattern: re.Pattern[str]) -> tuple[str, bool]:
    """The group id from a file stem (regex group 1); the stem itself when it does not match."""
    match = pattern.search(stem)
    return (match.group(1), True) if match else (stem, False)


def read_images(
    candidates: Sequence[tuple[Path, str, str | None, Collection]],
    cfg: DictConfig,
    staging: Path,
) -> tuple[list[ImageRecord], list[dict[str, str]], list[str]]:
    """Decode every candidate, stage it resized; (records, dropped files, stems without a group).

    With several collections a patient id is prefixed with its collection's name, so ids that
    two collections both use (``M01``) stay two people.
    """
    data = cfg.data
    several = len({collection.name for *_, collection in candidates}) > 1
    patterns = {
        collection.name: _group_regex(collection.group_pattern)
        for *_, collection in candidates
        if collection.group_pattern is not None
    }
    near = data.near_duplicates
    records: list[ImageRecord] = []
    dropped: list[dict[str, str]] = []
    ungrouped: list[str] = []
    for index, (path, class_name, split, collection) in enumerate(
        tqdm(candidates, desc="reading images", unit="file")
    ):
        try:
            raw = path.read_bytes()
            image = decode_image(raw, draft=data.image_size)  # as serving decodes uploads
        except (ImageError, OSError) as err:
            dropped.append({"file": str(path), "reason": str(err)})
            continue
        if collection.name in patterns:
            patient, matched = patient_of(path.stem, patterns[collection.name])
            if not matched:
                ungrouped.append(str(path))
        else:  # no person ids: each photo its own group until near duplicates merge them
            patient = str(path.relative_to(collection.folder).with_suffix(""))
        staged = staging / f"{index}.png"
        resize(image, data.image_size, data.resample).save(
            staged, compress_level=data.png_compress_level
        )
        records.append(
            ImageRecord(
                source=path,
                class_name=class_name,
                given_split=split,
                sha256=hashlib.sha256(raw).hexdigest(),
                pixel_sha256=_pixel_digest(image),
                detail=detail_map(image, near.thumbnail, near.blur_radius),
                staged=staged,
                patient=f"{collection.name}:{patient}" if several else patient,
                collection=collection.name,
            )
        )
    return records, dropped, ungrouped


def _group_regex(pattern: str) -> re.Pattern[str]:
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise DataError(f"group_pattern {pattern!r} is not a valid regex: {err}") from None
    if regex.groups < 1:
        raise DataError(f"group_pattern {pattern!r} needs a capture group (the group id)")
    return regex


def _pixel_digest(image: Image.Image) -> str:
    return hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()


# --------------------------------------------------------------------------- duplicates


def find_duplicates(
    records: Sequence[ImageRecord], near_cfg: DictConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Exact duplicates (same bytes or same decoded pixels) and near duplicates (detail maps)."""
    exact: list[dict[str, Any]] = []
    paired: set[tuple[int, int]] = set()
    for key, kind in (("sha256", "identical bytes"), ("pixel_sha256", "identical pixels")):
        by_digest: dict[str, list[int]] = defaultdict(list)
        for index, record in enumerate(records):
            by_digest[getattr(record, key)].append(index)
        for indices in by_digest.values():
            first = indices[0]
            for other in indices[1:]:
                if (first, other) not in paired:
                    paired.add((first, other))
                    exact.append(_pair(records, first, other, kind=kind))
    near: list[dict[str, Any]] = []
    if near_cfg.min_similarity is None or len(records) < 2:
        return exact, near
    maps = np.stack([record.detail for record in records])
    views = _dihedral_views(maps) if near_cfg.flips_and_rotations else [maps]
    anchors = _unit_rows(maps)
    candidates = [_unit_rows(view) for view in views]
    for start in range(0, len(records), SIMILARITY_CHUNK):
        block = anchors[start : start + SIMILARITY_CHUNK]
        similarity = block @ candidates[0].T
        for view in candidates[1:]:
            np.maximum(similarity, block @ view.T, out=similarity)
        for row, other in zip(*np.nonzero(similarity >= near_cfg.min_similarity), strict=True):
            first = start + int(row)
            if other > first and records[first].pixel_sha256 != records[other].pixel_sha256:
                score = round(float(similarity[row, other]), 4)
                near.append(_pair(records, first, int(other), similarity=score))
    return exact, near


def _dihedral_views(maps: np.ndarray) -> list[np.ndarray]:
    """The 8 flips and rotations of each (square) map, so mirrored copies are caught too."""
    rotations = [np.rot90(maps, turns, axes=(1, 2)) for turns in range(4)]
    return rotations + [rotation[:, :, ::-1] for rotation in rotations]


def _unit_rows(maps: np.ndarray) -> np.ndarray:
    """Flattened, zero-mean, unit-length rows; a featureless map stays all zeros."""
    rows = maps.reshape(len(maps), -1).astype(np.float32)
    rows = rows - rows.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)


def _pair(records: Sequence[ImageRecord], first: int, other: int, **what: Any) -> dict[str, Any]:
    return {
        "a": str(records[first].source),
        "b": str(records[other].source),
        **what,
        "classes": [records[first].class_name, records[other].class_name],
        "collections": [records[first].collection, records[other].collection],
    }


def merge_groups(
    patients: Iterable[str], linked_pairs: Iterable[tuple[str, str]]
) -> dict[str, str]:
    """Union-find: patient id -> merged group id ("A+B" when duplicates link A and B)."""
    parent = {patient: patient for patient in patients}

    def root(node: str) -> str:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for first, second in linked_pairs:
        a, b = root(first), root(second)
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[str, list[str]] = defaultdict(list)
    for patient in parent:
        members[root(patient)].append(patient)
    return {patient: "+".join(sorted(members[root(patient)])) for patient in parent}


# --------------------------------------------------------------------------- splitting


def split_groups(
    group_class: Mapping[str, int],
    group_size: Mapping[str, int],
    ratios: Mapping[str, float],
    rng: np.random.Generator,
) -> dict[str, str]:
    """Assign whole groups to splits, class by class, so image counts follow ``ratios``.

    Greedy: groups of one class in random order, biggest first, each to the split that is
    furthest below its target; a split with a positive ratio and no group of that class yet
    comes first, so small data sets still get every class in every split.
    """
    assignment: dict[str, str] = {}
    for class_index in sorted(set(group_class.values())):
        groups = sorted(g for g, c in group_class.items() if c == class_index)
        groups = [groups[i] for i in rng.permutation(len(groups))]
        groups.sort(key=lambda g: -group_size[g])
        total = sum(group_size[g] for g in groups)
        filled = dict.fromkeys(ratios, 0)
        for group in groups:
            split = max(
                (s for s in ratios if ratios[s] > 0),
                key=lambda s: (filled[s] == 0, ratios[s] * total - filled[s]),
            )
            assignment[group] = split
            filled[split] += group_size[group]
    return assignment


def kfold_groups(
    group_class: Mapping[str, int],
    group_size: Mapping[str, int],
    folds: int,
    fold: int,
    val_ratio: float,
    seed: int,
) -> dict[str, str]:
    """Patient-grouped stratified k-fold: fold ``fold`` is test, val carved from the rest."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = sorted(group_class)
    image_groups = [g for g in groups for _ in range(group_size[g])]
    image_labels = [group_class[g] for g in image_groups]
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    try:
        all_folds = list(splitter.split(np.zeros(len(image_groups)), image_labels, image_groups))
    except ValueError as err:
        raise DataError(f"cannot make {folds} grouped folds: {err}") from None
    test = {image_groups[i] for i in all_folds[fold][1]}
    rest = {g: group_class[g] for g in groups if g not in test}
    assignment = split_groups(
        rest, group_size, {"train": 1 - val_ratio, "val": val_ratio}, np.random.default_rng(seed)
    )
    assignment.update(dict.fromkeys(test, "test"))
    return assignment


def _validate_split_settings(data: DictConfig) -> None:
    ratios = {split: float(data.split[split]) for split in SPLITS}
    if any(r < 0 for r in ratios.values()) or abs(sum(ratios.values()) - 1) > 1e-6:
        raise DataError(f"data.split ratios must be >= 0 and sum to 1; got {ratios}")
    if data.folds and not (data.folds >= 2 and 0 <= data.fold < data.folds):
        raise DataError(
            f"data.folds must be 0 (ratio split) or >= 2 with 0 <= data.fold < data.folds; "
            f"got folds={data.folds}, fold={data.fold}"
        )
    if data.folds and any(c.layout == "presplit" for c in collections(data)):
        raise DataError("data.folds needs layout class_folders: a presplit layout keeps its splits")


def check_no_leaks(records: Sequence[ImageRecord]) -> list[dict[str, Any]]:
    """Groups found in more than one split (none allowed unless the splits were given)."""
    splits: dict[str, set[str]] = defaultdict(set)
    for record in records:
        splits[record.group].add(record.split)
    return [
        {"group": group, "splits": sorted(found, key=SPLITS.index)}
        for group, found in sorted(splits.items())
        if len(found) > 1
    ]


# --------------------------------------------------------------------------- the stage


def prepare(cfg: DictConfig) -> dict[str, Any]:
    """Run the `prepare` stage; returns the data report (also written to report.json)."""
    data = cfg.data
    _validate_split_settings(data)
    for collection in collections(data):
        if collection.group_pattern is not None:
            _group_regex(collection.group_pattern)
    prepared_dir = Path(cfg.paths.prepared_dir)
    report_dir = Path(cfg.paths.reports_dir) / "data"
    for collection in collections(data):
        _check_output_dir(prepared_dir, collection.folder)

    candidates, skipped = find_candidates(cfg)
    prepared_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{prepared_dir.name}-", dir=prepared_dir.parent))
    try:
        (work / "staging").mkdir()
        records, dropped, ungrouped = read_images(candidates, cfg, work / "staging")
        if dropped and data.strict:
            listing = "\n".join(f"  {d['file']}: {d['reason']}" for d in dropped)
            raise DataError(f"{len(dropped)} unreadable image(s) (data.strict=true):\n{listing}")
        _check_every_class_present(records, data)

        exact, near = find_duplicates(records, data.near_duplicates)
        by_source = {str(r.source): r for r in records}
        groups = merge_groups(
            {r.patient for r in records},
            ((by_source[p["a"]].patient, by_source[p["b"]].patient) for p in exact + near),
        )
        for record in records:
            record.group = groups[record.patient]
        _assign_splits(records, data, int(data.split_seed))

        leaks = check_no_leaks(records)
        if leaks and not any(c.layout == "presplit" for c in collections(data)):
            raise RuntimeError(f"internal error: groups in two splits: {leaks}")
        _place_files(records)
        out = work / "out"
        _write_prepared(out, records)
        report = _build_report(cfg, records, skipped, dropped, ungrouped, exact, near, leaks)
        report_dir.mkdir(parents=True, exist_ok=True)
        _write_samples(records, data, cfg.seed, report_dir / SAMPLES_NAME)
        if prepared_dir.exists():
            shutil.rmtree(prepared_dir)
        out.rename(prepared_dir)
        (report_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _print_summary(report)
    return report


def _check_output_dir(prepared_dir: Path, raw_dir: Path) -> None:
    """Refuse to clear a folder that holds the raw data or is not a prepared set of ours."""
    target = prepared_dir.resolve()
    if raw_dir.resolve() == target or target in raw_dir.resolve().parents:
        raise DataError(f"paths.prepared_dir {prepared_dir} would overwrite data.raw_dir {raw_dir}")
    if target.exists() and any(target.iterdir()) and not (target / MANIFEST_NAME).is_file():
        raise DataError(
            f"paths.prepared_dir {prepared_dir} is not empty and has no {MANIFEST_NAME}; "
            "refusing to replace a folder this stage did not write"
        )


def _check_every_class_present(records: Sequence[ImageRecord], data: DictConfig) -> None:
    counts = Counter(r.class_name for r in records)
    empty = [c for c in data.classes if counts[c] == 0]
    if empty:
        raise DataError(
            f"no usable images for class(es) {empty} under {data.raw_dir} (layout "
            f"{data.layout}, extensions {list(data.image_extensions)})"
        )


def _assign_splits(records: Sequence[ImageRecord], data: DictConfig, seed: int) -> None:
    """Given splits (presplit collections) are kept; the other groups are split whole,
    stratified by collection and class, so each split holds every collection in proportion."""
    for record in records:
        if record.given_split is not None:
            record.split = record.given_split
    free = [r for r in records if r.given_split is None]
    if not free:
        return
    strata: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for record in free:
        strata[record.group].append((record.collection, record.class_name))
    classes = list(data.classes)
    keys = sorted(
        {key for keys in strata.values() for key in keys},
        key=lambda key: (key[0], classes.index(key[1])),
    )
    group_class = {g: keys.index(Counter(ks).most_common(1)[0][0]) for g, ks in strata.items()}
    group_size = {g: len(ks) for g, ks in strata.items()}
    if data.folds:
        assignment = kfold_groups(
            group_class, group_size, data.folds, data.fold, data.split.val, seed
        )
    else:
        ratios = {split: float(data.split[split]) for split in SPLITS}
        assignment = split_groups(group_class, group_size, ratios, np.random.default_rng(seed))
    for record in free:
        record.split = assignment[record.group]


def _place_files(records: Sequence[ImageRecord]) -> None:
    """``<split>/<class>/<stem>.png``; a stem taken twice in one folder gets ``-2``, ``-3``."""
    taken: set[str] = set()
    for record in sorted(records, key=lambda r: str(r.source)):
        folder = f"{record.split}/{record.class_name}"
        name, counter = f"{folder}/{record.source.stem}.png", 1
        while name in taken:
            counter += 1
            name = f"{folder}/{record.source.stem}-{counter}.png"
        taken.add(name)
        record.file = name


def _manifest_order(records: Iterable[ImageRecord]) -> list[ImageRecord]:
    return sorted(records, key=lambda r: (SPLITS.index(r.split), r.class_name, r.file))


def _write_prepared(out: Path, records: Sequence[ImageRecord]) -> None:
    out.mkdir()
    for record in records:
        target = out / record.file
        target.parent.mkdir(parents=True, exist_ok=True)
        record.staged.rename(target)
        record.staged = target
    with (out / MANIFEST_NAME).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        for r in _manifest_order(records):
            writer.writerow(
                [r.file, str(r.source), r.collection, r.class_name, r.group, r.split, r.sha256]
            )


def _build_report(
    cfg: DictConfig,
    records: Sequence[ImageRecord],
    skipped: list[dict[str, str]],
    dropped: list[dict[str, str]],
    ungrouped: list[str],
    exact: list[dict[str, Any]],
    near: list[dict[str, Any]],
    leaks: list[dict[str, Any]],
) -> dict[str, Any]:
    data = cfg.data
    counts = {
        split: {c: sum(r.split == split and r.class_name == c for r in records)
                for c in data.classes}
        for split in SPLITS
    }
    for split_counts in counts.values():
        split_counts["total"] = sum(split_counts.values())
    members: dict[str, set[str]] = defaultdict(set)
    for record in records:
        members[record.group].add(record.patient)
    by_collection = {
        collection: {c: sum(r.collection == collection and r.class_name == c for r in records)
                     for c in data.classes}
        for collection in dict.fromkeys(r.collection for r in records)
    }  # fmt: skip
    return {
        "layout": data.layout,
        "raw_dir": str(data.raw_dir),
        "collections": by_collection,
        "classes": list(data.classes),
        "folds": data.folds,
        "fold": data.fold,
        "seed": int(cfg.data.split_seed),
        "split": {split: float(data.split[split]) for split in SPLITS},
        "image_size": data.image_size,
        "group_pattern": data.group_pattern,
        "totals": {
            "files": len(records) + len(dropped) + len(skipped),
            "images": len(records),
            "dropped": len(dropped),
            "skipped": len(skipped),
            "groups": len(members),
            "patients": len({r.patient for r in records}),
            "duplicates": len(exact),
            "near_duplicates": len(near),
            **{c: sum(r.class_name == c for r in records) for c in data.classes},
        },
        "counts": counts,
        "groups": {s: len({r.group for r in records if r.split == s}) for s in SPLITS},
        "dropped": dropped,
        "skipped": skipped,
        "ungrouped_files": ungrouped,
        "duplicates": exact,
        "near_duplicates": near,
        "merged_groups": sorted(sorted(m) for m in members.values() if len(m) > 1),
        "label_conflicts": [p for p in exact + near if len(set(p["classes"])) > 1],
        # the same photo in two collections: a group across them, never across splits
        "cross_collection_pairs": [p for p in exact + near if len(set(p["collections"])) > 1],
        "leaks_between_given_splits": leaks,
    }


def _write_samples(
    records: Sequence[ImageRecord], data: DictConfig, seed: int, path: Path
) -> None:
    """A grid of training images titled with their class, classes interleaved."""
    from matplotlib.figure import Figure

    grid = data.sample_grid
    rng = np.random.default_rng(seed)
    train = [r for r in records if r.split == "train"]
    per_class = [
        [train_of_class[i] for i in rng.permutation(len(train_of_class))]
        for train_of_class in ([r for r in train if r.class_name == c] for c in data.classes)
    ]
    interleaved = [r for row in _zip_longest(per_class) for r in row]
    figure = Figure(figsize=(grid.cols * grid.cell_inches, grid.rows * grid.cell_inches))
    axes = figure.subplots(grid.rows, grid.cols, squeeze=False).flatten()
    for ax in axes:
        ax.set_axis_off()  # before drawing: no tick layout work (most of the cost)
    for ax, record in zip(axes, interleaved, strict=False):
        with Image.open(record.staged) as image:
            ax.imshow(np.asarray(image))
        ax.set_title(record.class_name)
    figure.savefig(path, format="png")


def _zip_longest(lists: Sequence[list[ImageRecord]]) -> Iterable[list[ImageRecord]]:
    for position in range(max((len(items) for items in lists), default=0)):
        yield [items[position] for items in lists if position < len(items)]


def _print_summary(report: dict[str, Any]) -> None:
    classes = report["classes"]
    width = max(len(c) for c in [*classes, "groups", "split"]) + 2
    header = "split".ljust(7) + "".join(c.rjust(width) for c in [*classes, "total", "groups"])
    lines = [header, "-" * len(header)]
    for split in SPLITS:
        counts = report["counts"][split]
        cells = [counts[c] for c in classes] + [counts["total"], report["groups"][split]]
        lines.append(split.ljust(7) + "".join(str(v).rjust(width) for v in cells))
    totals = report["totals"]
    lines.append(
        f"{totals['images']} images from {totals['files']} files: {totals['dropped']} dropped, "
        f"{totals['skipped']} skipped, {totals['duplicates']} duplicate and "
        f"{totals['near_duplicates']} near-duplicate pair(s), {totals['groups']} groups"
    )
    if len(report["collections"]) > 1:
        lines.append(
            "collections: " + ", ".join(
                f"{name} {sum(counts.values())}" for name, counts in report["collections"].items()
            ) + f"; {len(report['cross_collection_pairs'])} duplicate pair(s) across them "
            "(report.json: cross_collection_pairs)"
        )
    if report["label_conflicts"]:
        lines.append(
            f"WARNING: {len(report['label_conflicts'])} duplicate pair(s) carry different "
            "classes (report.json: label_conflicts)"
        )
    if report["leaks_between_given_splits"]:
        lines.append(
            f"WARNING: {len(report['leaks_between_given_splits'])} group(s) span the given "
            "splits (report.json: leaks_between_given_splits)"
        )
    if report["ungrouped_files"]:
        lines.append(
            f"{len(report['ungrouped_files'])} file(s) matched no data.group_pattern and are "
            "their own group (report.json: ungrouped_files)"
        )
    print("\n".join(lines))


# --------------------------------------------------------------------------- loading


def _manifest_rows(cfg: DictConfig, split: str) -> list[dict[str, str]]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    with (Path(cfg.paths.prepared_dir) / MANIFEST_NAME).open(newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["split"] == split]


def split_groups_of(cfg: DictConfig, split: str) -> list[str]:
    """The patient group (near duplicates merged) of each image of ``split``, in the order of
    :func:`load_split`: what keeps one patient's photos in one cross-validation fold."""
    return [row["group"] for row in _manifest_rows(cfg, split)]


def split_collections_of(cfg: DictConfig, split: str) -> list[str]:
    """The collection of each image of ``split``, in the order of :func:`load_split` (manifests
    written before collections existed have none: one unnamed collection)."""
    return [row.get("collection") or "" for row in _manifest_rows(cfg, split)]


def group_folds(groups: Sequence[str], labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each image's fold (0 .. folds - 1) in a patient-grouped, class-stratified k-fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_of = np.full(len(groups), -1, dtype=np.int64)
    try:
        for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(groups)), labels, groups)):
            fold_of[held_out] = fold
    except ValueError as err:
        raise DataError(f"cannot make {folds} grouped folds: {err}") from None
    return fold_of


def load_split(cfg: DictConfig, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images float32 N x S x S x 3, labels by index in data.classes, paths) in manifest order."""
    data = cfg.data
    prepared_dir = Path(cfg.paths.prepared_dir)
    classes = list(data.classes)
    rows = _manifest_rows(cfg, split)
    unknown = sorted({row["class"] for row in rows} - set(classes))
    if unknown:
        raise ValueError(f"manifest classes {unknown} are not in data.classes {classes}")
    paths = [str(prepared_dir / row["file"]) for row in rows]
    images = np.zeros((len(paths), data.image_size, data.image_size, 3), dtype=np.float32)
    for index, path in enumerate(paths):
        images[index] = preprocess_file(path, data.image_size, data.resample)
    labels = np.array([classes.index(row["class"]) for row in rows], dtype=np.int64)
    return images, labels, paths


def run(cfg: DictConfig) -> None:
    try:
        prepare(cfg)
    except DataError as err:
        raise SystemExit(f"prepare failed: {err}") from None


main = stage_entry(run)

if __name__ == "__main__":
    main()
