"""The Bento carries what the service imports: a package missing from bentofile.yaml only
fails inside the built container, where no test runs."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

import yaml

from pox_pipeline.common.params import project_root

PROJECT_ROOT = project_root()

PACKAGE = "pox_pipeline"


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def service_closure() -> tuple[set[Path], set[str]]:
    """The package's files reached from service.py (imports anywhere in a file, parent packages
    included), and the top-level third-party modules they import."""
    todo, seen, third_party = [PROJECT_ROOT / "service.py"], set(), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _imports(path):
            parts = module.split(".")
            if parts[0] == PACKAGE:
                for depth in range(1, len(parts) + 1):
                    base = PROJECT_ROOT / "src" / "/".join(parts[:depth])
                    todo += [c for c in (base.with_suffix(".py"), base / "__init__.py")
                             if c.is_file()]  # fmt: skip
            elif parts[0] not in sys.stdlib_module_names and parts[0] != "__future__":
                third_party.add(parts[0])
    return seen - {PROJECT_ROOT / "service.py"}, third_party


def service_imports() -> set[str]:
    """Top-level third-party modules reached from service.py through the package's modules."""
    return service_closure()[1]


def requirement_closure(names: list[str]) -> set[str]:
    """The listed distributions and everything they require (extras left out)."""
    closure: set[str] = set()
    todo = [_normal(n) for n in names]
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        try:
            needs = requires(name) or []
        except PackageNotFoundError:
            continue
        for line in needs:
            if "extra ==" in line:
                continue
            todo.append(_normal(re.split(r"[\s;<>=!~\[(]", line, maxsplit=1)[0]))
    return closure


def test_bentofile_packages_cover_every_import_of_the_service() -> None:
    bentofile = yaml.safe_load((PROJECT_ROOT / "bentofile.yaml").read_text())
    listed = [re.split(r"[<>=!~\[]", p, maxsplit=1)[0] for p in bentofile["python"]["packages"]]
    shipped = requirement_closure(listed)
    distributions = packages_distributions()
    imports = service_imports()
    assert {"bentoml", "numpy", "PIL"} <= imports  # the walk reached service.py's own imports
    missing = {
        module: distributions.get(module)
        for module in imports
        if not any(_normal(d) in shipped for d in distributions.get(module, [module]))
    }
    assert not missing, f"imported by the service but not in bentofile.yaml: {missing}"


def test_the_bento_ships_exactly_the_modules_the_service_imports() -> None:
    """No training, release or ops code in the Bento (nor in its image), and nothing missing."""
    bentofile = yaml.safe_load((PROJECT_ROOT / "bentofile.yaml").read_text())
    shipped = {
        path
        for pattern in bentofile["include"]
        if pattern.startswith(f"src/{PACKAGE}/") and pattern.endswith(".py")
        for path in PROJECT_ROOT.glob(pattern)
    }
    files, _ = service_closure()
    assert shipped == files, (
        f"missing: {sorted(str(p) for p in files - shipped)}; "
        f"not imported by the service: {sorted(str(p) for p in shipped - files)}"
    )
