"""Resolve a recipe parameter for one tensor: filters, gradients, precedence."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mergekit.config import Conditional, Parameters


def interpolate_gradient(gradient: Sequence[float], t: float) -> float:
    """Piecewise-linear value at position t in [0, 1] over evenly spaced anchors."""
    if len(gradient) == 1:
        return float(gradient[0])
    pos = min(max(t, 0.0), 1.0) * (len(gradient) - 1)
    i = min(int(pos), len(gradient) - 2)
    frac = pos - i
    return float(gradient[i]) * (1.0 - frac) + float(gradient[i + 1]) * frac


def _match(setting: tuple[Conditional, ...], tensor_name: str) -> Conditional | None:
    for cond in setting:
        if cond.filter is None or cond.filter in tensor_name:
            return cond
    return None


def resolve(
    levels: Sequence[Parameters | None], name: str, tensor_name: str, t: float
) -> tuple[bool, Any]:
    """The value of parameter ``name`` from the first level that sets it for this tensor.

    ``levels`` are ordered highest precedence first. Returns (found, value).
    """
    for params in levels:
        if not params or name not in params:
            continue
        cond = _match(params[name], tensor_name)
        if cond is None:
            continue  # no filter matched: fall through to the next level
        value = cond.value
        if isinstance(value, tuple):
            value = interpolate_gradient(value, t)
        return True, value
    return False, None
