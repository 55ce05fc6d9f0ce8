"""Renamed params keys, kept working for one release.

A key that moved stays in conf/ with ``???`` (OmegaConf's "no value"), so that a Hydra override
of it (``dvc exp run -S serve.publish_backends=...``) is still accepted, and its new key reads
``${oc.select:<old key>,<default>}``: composed, the new key follows the old one where that was
set. Its reader then takes the old key's value with a FutureWarning that names the new key
(:func:`moved_keys`); a params file written before the rename, without the new key, works the
same way. Plain Python and OmegaConf-free: the service reads its settings through it.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

UNSET = "???"  # OmegaConf's MISSING: what conf/ gives a deprecated key nobody sets


def is_set(value: Any) -> bool:
    """A deprecated key holds a value (neither absent, null nor ``???``)."""
    return value is not None and value != UNSET


def dotted(tree: Mapping[str, Any], key: str) -> Any:
    """``tree["a"]["b"]`` for ``key`` ``a.b`` in plain nested dicts; None where absent."""
    for part in key.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def moved_keys(
    section: Mapping[str, Any], name: str, moves: Mapping[str, str], params: Mapping[str, Any]
) -> dict[str, Any]:
    """Section ``name`` of the params (``section``: plain nested dicts, not changed) with each
    renamed key's old value moved in. ``moves``: each deprecated dotted key, from the params'
    root, to its new dotted key in this section; ``params``: the params' root (plain nested
    dicts) that holds the old keys.

    A deprecated key that is set gives its value to its new key, with one FutureWarning naming
    the new keys. Where the new key holds another value, both were set: a ValueError.
    """
    section = copy.deepcopy(dict(section))
    used = []
    for old, new in moves.items():
        value = dotted(params, old)
        if not is_set(value):
            continue
        *parents, leaf = new.split(".")
        node = section
        for part in parents:
            node = node.setdefault(part, {})
        if leaf in node and node[leaf] != value:
            raise ValueError(
                f"{old}={value!r} (deprecated) and {name}.{new}={node[leaf]!r} are both set and "
                f"differ: set only {name}.{new}"
            )
        node[leaf] = value
        used.append(f"{old} -> {name}.{new}")
    if used:
        warnings.warn(
            f"deprecated params, removed in the next release: {', '.join(used)}. Their values "
            "are used for the new keys; set those instead (docs/configuration.md).",
            FutureWarning, stacklevel=3,
        )  # fmt: skip
    return section
