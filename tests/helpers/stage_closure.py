"""What a stage's code really imports and which config keys it reads, found statically.

``import_closure(module)``: every ``pox_pipeline`` module that ``python -m <module>`` executes
(imports anywhere in a module, function-local ones included; ``if TYPE_CHECKING:`` blocks
excluded), as files.

``config_reads(module)``: the dotted config keys read by the functions reachable from the
module's top level. A function is reachable when a reachable one names it (calls it, passes it,
decorates with it); reaching a class reaches its methods. Inside a function, a parameter named
``cfg`` is the whole config and names assigned from it are aliases (``model_cfg =
cfg.model[name]``); a key is read where an attribute chain off such a name is used:
``cfg.data.classes`` reads ``data.classes``, ``cfg.model[name]`` reads ``model.*``,
``node.get("key")`` reads ``key``, a method called on a node (``.items()``) reads the node. A
node passed to a package function binds that function's parameter (its reads count, not the
node's); passed anywhere else (a library call, a dispatch table) the whole node counts as read.
The bare config handed on whole (``OmegaConf.resolve(cfg)``, the log of every param to MLflow)
is bookkeeping, not a read.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "pox_pipeline"
CONFIG_NAME = "cfg"
WILDCARD = "*"

Key = tuple[str, ...]
Bindings = frozenset[tuple[str, Key]]


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    imports: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # local -> target
    defs: dict[str, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef] = field(
        default_factory=dict
    )


class Package:
    def __init__(self, src: Path) -> None:
        self.src = src

    def path_of(self, module: str) -> Path | None:
        base = self.src / module.replace(".", "/")
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def runs_nothing(self, name: str) -> bool:
        """A module that is only a docstring (a subpackage's ``__init__.py``): no stage's
        result can depend on it, so it is no DVC dependency."""
        body = self.module(name).tree.body
        return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)

    @functools.cache  # noqa: B019 - one Package per test session
    def module(self, name: str) -> Module:
        path = self.path_of(name)
        assert path is not None, name
        module = Module(name, path, ast.parse(path.read_text(), str(path)))
        for node in module.tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                module.defs[node.name] = node
        for node in _runtime_nodes(module.tree):
            if isinstance(node, ast.ImportFrom):
                origin = self._absolute(name, node)
                for alias in node.names:
                    local = alias.asname or alias.name
                    if self.path_of(f"{origin}.{alias.name}"):  # a submodule
                        module.imports[local] = (f"{origin}.{alias.name}", None)
                    elif origin.split(".")[0] == PACKAGE:
                        module.imports[local] = (origin, alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == PACKAGE and alias.asname:
                        module.imports[alias.asname] = (alias.name, None)
        return module

    def _absolute(self, name: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = name if self.path_of(name).name == "__init__.py" else name.rsplit(".", 1)[0]
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        return ".".join([*parts, *([node.module] if node.module else [])])

    def imported_modules(self, name: str) -> set[str]:
        """The package modules ``name`` imports directly (with their parent packages)."""
        found: set[str] = set()
        for node in _runtime_nodes(self.module(name).tree):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                origin = self._absolute(name, node)
                targets.append(origin)
                targets += [f"{origin}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
            for target in targets:
                parts = target.split(".")
                if parts[0] != PACKAGE:
                    continue
                found |= {
                    ".".join(parts[:i])
                    for i in range(1, len(parts) + 1)
                    if self.path_of(".".join(parts[:i]))
                }
        return found

    def import_closure(self, entry: str) -> set[str]:
        todo, seen = [entry], set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            parts = name.split(".")
            todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parents run first
            todo += self.imported_modules(name)
        return seen

    def resolve(self, module: str, name: str) -> tuple[str, str | None] | None:
        """What ``name`` in ``module`` refers to: (module, def) or (module, None) for a module."""
        mod = self.module(module)
        if name in mod.defs:
            return module, name
        if name not in mod.imports:
            return None
        target, attr = mod.imports[name]
        if attr is None:
            return target, None
        if self.path_of(target) is None:
            return None
        return self.resolve(target, attr) if target != module else None

    def config_reads(self, entry: str) -> set[Key]:
        reads: set[Key] = set()
        # the entry module runs as __main__; the others run their top level on import, which
        # reaches what it calls (not what it only names: ``main = stage_entry(run)``)
        tops = {
            name: self.module(name).tree
            if name == entry
            else _imported_body(self.module(name).tree)
            for name in self.import_closure(entry)
        }  # kept alive: `seen` holds their ids
        todo: list[tuple[str, ast.AST, Bindings]] = [
            (name, top, frozenset()) for name, top in tops.items()
        ]
        seen: set[tuple[str, int, Bindings]] = set()
        while todo:
            module, node, bindings = todo.pop()
            if (module, id(node), bindings) in seen:
                continue
            seen.add((module, id(node), bindings))
            visitor = _Reads(
                self,
                module,
                node,
                dict(bindings),
                calls_only=node is not self.module(module).tree and isinstance(node, ast.Module),
            )
            reads |= visitor.reads
            for target_module, definition, target_bindings in visitor.reached:
                if isinstance(definition, ast.ClassDef):
                    todo += [
                        (target_module, item, frozenset())
                        for item in definition.body
                        if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
                    ]
                todo.append((target_module, definition, target_bindings))
        return reads


def _imported_body(tree: ast.Module) -> ast.Module:
    """A module as an import runs it: without its ``if __name__ == "__main__":`` block."""
    body = [
        node for node in tree.body
        if not (isinstance(node, ast.If) and "__main__" in ast.unparse(node.test))
    ]  # fmt: skip
    return ast.Module(body=body, type_ignores=[])


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, except those under ``if TYPE_CHECKING:`` (never executed)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def _chain(node: ast.AST) -> tuple[str, Key] | None:
    """``cfg.a["b"][x].get("c")`` -> ("cfg", ("a", "b", "*", "c")); None for anything else."""
    if isinstance(node, ast.Name):
        return node.id, ()
    if isinstance(node, ast.Attribute):
        inner = _chain(node.value)
        return inner and (inner[0], (*inner[1], node.attr))
    if isinstance(node, ast.Subscript):
        inner = _chain(node.value)
        if inner is None:
            return None
        key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            return inner[0], (*inner[1], key.value)
        if isinstance(key, ast.Constant | ast.Slice):  # an item of a list: the list is read
            return inner
        return inner[0], (*inner[1], WILDCARD)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        inner = _chain(node.func.value)
        return inner and (inner[0], (*inner[1], node.args[0].value))
    return None


class _Reads(ast.NodeVisitor):
    """The config reads of one function (or module top level) and the defs it reaches."""

    def __init__(
        self, package: Package, module: str, node: ast.AST, bindings: dict, calls_only: bool
    ) -> None:
        self.package, self.module, self.calls_only = package, module, calls_only
        self.reads: set[Key] = set()
        self.reached: list[tuple[str, ast.AST, Bindings]] = []
        self.env: dict[str, Key] = dict(bindings)
        body = [node] if not isinstance(node, ast.Module) else node.body
        top_level = isinstance(node, ast.Module)
        for arg in ast.walk(node) if not top_level else ():
            if isinstance(arg, ast.arg) and arg.arg == CONFIG_NAME:
                self.env[arg.arg] = ()
        self._find_aliases(node)
        for statement in body:
            if top_level and isinstance(statement, ast.FunctionDef | ast.ClassDef):
                for decorator in statement.decorator_list:  # run at import
                    self.visit(decorator)
            elif isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef):
                for child in [*statement.decorator_list, *statement.body]:
                    self.visit(child)
                for default in [*statement.args.defaults, *statement.args.kw_defaults]:
                    if default is not None:
                        self.visit(default)
            else:
                self.visit(statement)

    def _find_aliases(self, node: ast.AST) -> None:
        changed = True
        while changed:
            changed = False
            for item in ast.walk(node):
                target, value = None, None
                if isinstance(item, ast.Assign) and len(item.targets) == 1:
                    target, value = item.targets[0], item.value
                elif isinstance(item, ast.AnnAssign) and item.value is not None:
                    target, value = item.target, item.value
                elif isinstance(item, ast.For):
                    target, value = item.target, item.iter
                if not isinstance(target, ast.Name) or target.id in self.env:
                    continue
                key = self._key(value)
                if key is not None:
                    self.env[target.id] = key if not isinstance(item, ast.For) else (*key, WILDCARD)
                    changed = True

    def _key(self, node: ast.AST | None) -> Key | None:
        found = _chain(node) if node is not None else None
        if found is None or found[0] not in self.env:
            return None
        return (*self.env[found[0]], *found[1])

    def _record(self, key: Key) -> None:
        if key:  # the bare config handed on whole is bookkeeping
            self.reads.add(key)

    def _reach(self, node: ast.AST, bindings: Bindings = frozenset(), call: bool = False) -> bool:
        target = self._target(node)
        if self.calls_only and not call:
            return target is not None
        if target is None:
            return False
        module, name = target
        if name is not None:
            self.reached.append((module, self.package.module(module).defs[name], bindings))
        return True

    def _target(self, node: ast.AST) -> tuple[str, str | None] | None:
        if isinstance(node, ast.Name):
            return self.package.resolve(self.module, node.id)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            owner = self.package.resolve(self.module, node.value.id)
            if owner is not None and owner[1] is None:  # module.function
                return self.package.resolve(owner[0], node.attr)
        return None

    def visit_Assign(self, node: ast.Assign) -> None:
        if len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if self._key(node.value) is not None and self.env.get(node.targets[0].id) is not None:
                return  # an alias: its uses are the reads
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        key = self._key(node)  # node.get("key")
        if key is not None:
            self._record(key)
            return
        target = self._target(node.func)
        callee = None
        if target is not None and target[1] is not None:
            definition = self.package.module(target[0]).defs[target[1]]
            if isinstance(definition, ast.FunctionDef | ast.AsyncFunctionDef):
                callee = definition
        bindings: dict[str, Key] = {}
        positional = [a.arg for a in callee.args.posonlyargs + callee.args.args] if callee else []
        rest = []
        for index, arg in enumerate(node.args):
            key = self._key(arg)
            if key is not None and callee is not None and index < len(positional):
                bindings[positional[index]] = key
            else:
                rest.append(arg)
        for keyword in node.keywords:
            key = self._key(keyword.value)
            if key is not None and callee is not None and keyword.arg:
                bindings[keyword.arg] = key
            else:
                rest.append(keyword.value)
        if not self._reach(node.func, frozenset(bindings.items()), call=True):
            method_of = self._key(node.func.value) if isinstance(node.func, ast.Attribute) else None
            if method_of is not None:  # node.items(), list.index(...)
                self._record(method_of)
            else:
                self.visit(node.func)
        for arg in rest:
            self.visit(arg)

    def _use(self, node: ast.expr) -> None:
        key = self._key(node)
        if key is not None:
            self._record(key)
            if isinstance(node, ast.Subscript):
                self.visit(node.slice)
        elif not self._reach(node):
            self.generic_visit(node)

    visit_Name = visit_Attribute = visit_Subscript = _use  # noqa: N815
