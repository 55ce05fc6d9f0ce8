"""dvc.yaml follows the code: each stage's ``deps`` list exactly the package modules its command
imports, and its ``params`` cover exactly the config keys that code reads
(tests/helpers/stage_closure.py says how both are found). Editing a module then re-runs the
stages that run it, and only those."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from helpers.stage_closure import WILDCARD, Key, Package
from pox_pipeline.common.params import project_root

PROJECT_ROOT = project_root()
SRC = PROJECT_ROOT / "src"
ENTRY = re.compile(r"python -m ([\w.]+)")
INTERPOLATION = re.compile(r"\$\{([^}]+)\}")


@pytest.fixture(scope="module")
def package() -> Package:
    return Package(SRC)


def resolved_stages(root: Path) -> list:
    """dvc.yaml as DVC resolves it (foreach expanded, ${...} filled from params.yaml)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return list(repo.index.stages)


def stage_problems(root: Path, package: Package) -> list[str]:
    """Every mismatch between dvc.yaml and what the stages' code imports and reads."""
    raw = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    problems = []
    for stage in resolved_stages(root):
        name, _, item = stage.name.partition("@")
        entry = ENTRY.search(stage.cmd).group(1)
        code = {
            str(package.path_of(m).relative_to(package.src.parent))
            for m in package.import_closure(entry)
            if not package.runs_nothing(m)
        }
        listed = {
            dep.def_path for dep in stage.deps
            if not hasattr(dep, "params") and dep.def_path.startswith(f"src/{entry.split('.')[0]}")
        }  # fmt: skip
        problems += [
            f"{stage.name}: imports {path}, missing from deps" for path in sorted(code - listed)
        ]
        problems += [
            f"{stage.name}: deps list {path}, which it never imports"
            for path in sorted(listed - code)
        ]

        params = {
            tuple(key.split("."))
            for dep in stage.deps
            if hasattr(dep, "params")
            for key in dep.params
        }
        # keys the stage's own definition holds (cmd overrides, ${...} paths) change it anyway
        definition = yaml.safe_dump(raw[name])
        exempt = {tuple(k.split(".")) for k in INTERPOLATION.findall(definition) if k != "item"}
        exempt |= {(token.split("=")[0],) for token in stage.cmd.split()[3:] if "=" in token}
        reads = {_for_item(key, item) for key in package.config_reads(entry)}
        for key in sorted(reads):
            if not any(_covers(p, key) for p in params | exempt):
                problems.append(f"{stage.name}: reads {'.'.join(key)}, missing from params")
        for key in sorted(params):
            if not any(_covers(key, r) or _covers(r, key) for r in reads):
                problems.append(f"{stage.name}: params list {'.'.join(key)}, which it never reads")
    return problems


def _for_item(key: Key, item: str) -> Key:
    """In a ``foreach`` stage, ``cfg.model[name]`` is the stage's own item."""
    return tuple(item if part == WILDCARD and item else part for part in key)


def _covers(prefix: Key, key: Key) -> bool:
    return key[: len(prefix)] == prefix


def test_dvc_yaml_deps_and_params_follow_the_code(package: Package) -> None:
    problems = stage_problems(PROJECT_ROOT, package)
    assert not problems, "dvc.yaml is out of step with the code:\n" + "\n".join(problems)


def test_the_closure_follows_imports_through_modules(package: Package) -> None:
    """train runs colour_texture.py only through models.py; evaluate reads the bootstrap settings
    only inside a helper it calls with the whole config."""
    train, evaluate = "pox_pipeline.training.train", "pox_pipeline.training.evaluate"
    assert "pox_pipeline.models.colour_texture" in package.import_closure(train)
    assert train not in package.import_closure(evaluate)
    reads = package.config_reads("pox_pipeline.training.evaluate")
    assert ("evaluate", "bootstrap", "samples") in reads
    assert not any(key[0] == "model" for key in reads)


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """dvc.yaml and params.yaml in a DVC repository of their own (the code stays in SRC)."""
    from dvc.repo import Repo

    Repo.init(str(tmp_path), no_scm=True).close()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(PROJECT_ROOT / name, tmp_path / name)
    (tmp_path / "src").symlink_to(SRC)
    return tmp_path


def test_a_missing_module_or_key_is_reported(project_copy: Path, package: Package) -> None:
    dvc_yaml = project_copy / "dvc.yaml"
    stages = yaml.safe_load(dvc_yaml.read_text())
    evaluate = stages["stages"]["evaluate"]["do"]
    evaluate["deps"].remove("src/pox_pipeline/common/temperature.py")
    evaluate["deps"].append("src/pox_pipeline/training/train.py")
    evaluate["params"].remove("seed")
    dvc_yaml.write_text(yaml.safe_dump(stages, sort_keys=False))

    problems = stage_problems(project_copy, package)
    models = yaml.safe_load((project_copy / "params.yaml").read_text())["models"]
    for model in models:
        assert (
            f"evaluate@{model}: imports src/pox_pipeline/common/temperature.py, missing from deps"
            in problems
        )
        assert (
            f"evaluate@{model}: deps list src/pox_pipeline/training/train.py, which it never "
            "imports" in problems
        )
        assert f"evaluate@{model}: reads seed, missing from params" in problems
    assert len(problems) == 3 * len(models)


# one module per kind of reach (each `dvc status` takes seconds): imported through another
# module by three stages, by one stage only, by the last stage, by two, by the first
def module_name(relative: Path) -> str:
    """``pox_pipeline/models/inference.py`` -> ``pox_pipeline.models.inference``."""
    return ".".join(relative.with_suffix("").parts).removesuffix(".__init__")


TOUCHED = ("models/colour_texture.py", "models/architectures.py", "release/select.py",
           "common/temperature.py", "data/synthetic.py")


def test_touching_a_module_changes_exactly_the_stages_that_import_it(
    tmp_path: Path, package: Package, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through DVC itself: a locked pipeline (stand-in outputs, `dvc commit`), then each
    module edited in turn; `dvc status` names the stages whose code imports it, no others."""
    from dvc.repo import Repo

    root = tmp_path / "project"
    root.mkdir()
    Repo.init(str(root), no_scm=True).close()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(PROJECT_ROOT / name, root / name)
    shutil.copytree(SRC, root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(root)  # DVC resolves the stages' paths from the working directory
    with Repo(str(root)) as repo:
        stages = list(repo.index.stages)
        for stage in stages:
            for item in [*stage.outs, *(d for d in stage.deps if not hasattr(d, "params"))]:
                path = Path(item.fs_path)
                if path.exists():
                    continue
                target = path if not path.suffix else None  # a folder output holds a file
                (target or path.parent).mkdir(parents=True, exist_ok=True)
                (target / "stand-in" if target else path).write_text("stand-in\n")
        repo.commit(force=True)
        assert repo.status() == {}

        package_dir = root / "src" / "pox_pipeline"
        for module in (package_dir / name for name in TOUCHED):
            original = module.read_text()
            module.write_text(original + "# touched\n")
            relative = str(module.relative_to(root))
            changed = {
                name
                for name, changes in repo.status().items()
                for change in changes
                if isinstance(change, dict) and relative in change.get("changed deps", {})
            }
            module.write_text(original)
            importers = {
                stage.addressing for stage in stages
                if module_name(module.relative_to(root / "src")) in
                package.import_closure(ENTRY.search(stage.cmd).group(1))
            }  # fmt: skip
            assert changed == importers, relative
            if module.name == "colour_texture.py":  # colour_texture's features: train and evaluate
                assert {"train@colour_texture", "evaluate@colour_texture"} <= changed
            if module.name == "architectures.py":  # crosscheck retrains through train
                assert {name.split("@")[0] for name in changed} == {"train", "crosscheck"}
