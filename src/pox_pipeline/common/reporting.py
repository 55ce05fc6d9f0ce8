"""How a metric value is reported: an undefined one (NaN) as JSON null, a figure with its
bootstrap interval as text. One home, so every report, card and log line writes them alike.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any


def undefined(value: Any) -> bool:
    """None or NaN: a metric that could not be computed (an AUC on photos of one class)."""
    return value is None or (isinstance(value, numbers.Real) and math.isnan(value))


def json_ready(value: Any) -> Any:
    """NaN as null, in nested mappings too: ``json.dumps`` would write NaN, which is not JSON
    and which DVC, browsers and jq refuse."""
    if isinstance(value, Mapping):
        return {k: json_ready(v) for k, v in value.items()}
    return None if undefined(value) else value


def interval(values: Mapping[str, Any], name: str) -> tuple[float, float] | None:
    """``name``'s bootstrap interval (``<name>_ci_low``, ``<name>_ci_high``, as evaluate
    writes them); None when it was not computed or is undefined."""
    low, high = values.get(f"{name}_ci_low"), values.get(f"{name}_ci_high")
    return None if undefined(low) or undefined(high) else (float(low), float(high))


def interval_text(values: Mapping[str, Any], name: str) -> str:
    """A metric with its interval, as "0.714 [0.500, 0.895]"; the value alone without one,
    "n/a" when the metric itself is undefined."""
    value = values.get(name)
    if undefined(value):
        return "n/a"
    bounds = interval(values, name)
    text = f"{float(value):.3f}"
    return text if bounds is None else f"{text} [{bounds[0]:.3f}, {bounds[1]:.3f}]"
