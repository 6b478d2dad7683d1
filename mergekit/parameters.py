"""Resolve a recipe parameter for one tensor: filters, gradients, precedence."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from mergekit.config import MergeConfiguration
from mergekit.errors import usage_error
from mergekit.recipe_fields import Conditional, Parameters
from mergekit.recipe_text import short_repr, yaml_key

if TYPE_CHECKING:
    from mergekit.methods.registry import Method


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


@dataclass(frozen=True)
class ModelLevels:
    """Where one input model's per-model parameters come from, highest precedence first."""

    model: str
    where: str  # YAML path of the model's entry, for errors
    levels: Sequence[Parameters | None]


def method_params(
    method: Method,
    per_model: Sequence[ModelLevels],
    global_levels: Sequence[Parameters | None],
    tensor: str,
    t: float,
    seed: int | None,
) -> dict[str, Any]:
    """The method's validated parameters for one tensor: per-model ones as tuples aligned
    with ``per_model``, the others once. Missing or invalid values are recipe errors."""
    values: dict[str, Any] = {}
    for spec in method.params:
        if spec.per_model:
            per = []
            for m in per_model:
                found, v = resolve(m.levels, spec.name, tensor, t)
                if not found:
                    if spec.required:
                        raise usage_error(
                            f"{m.where}.parameters",
                            f"'{method.name}' needs {spec.name!r} for model {m.model} "
                            f"(tensor {tensor}) and none is set",
                            f"set {spec.name} under this model's parameters or the "
                            "top-level parameters")
                    v = spec.default
                per.append(v)
            values[spec.name] = tuple(per)
        else:
            found, v = resolve(global_levels, spec.name, tensor, t)
            if found:
                values[spec.name] = v
            elif spec.required:
                raise usage_error(
                    "parameters", f"'{method.name}' needs {spec.name!r} (tensor {tensor}) "
                    "and none is set", f"set {spec.name} under parameters")
    if seed is not None:
        values["seed"] = seed
    try:
        params = method.make_params(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        name = str(err["loc"][0]) if err["loc"] else None
        spec = method.param(name) if name else None
        k = _culprit(method, values, len(per_model)) if spec is None or spec.per_model else None
        if k is not None:  # one model's values are invalid: name its entry
            m = per_model[k]
            what = f"{name} {short_repr(values[name][k])}: {msg}" if name else msg
            raise usage_error(m.where, f"{what} (model {m.model}, tensor {tensor})",
                              "fix the value where it is set for this model") from None
        if name:
            raise usage_error(f"parameters.{name}", f"{msg} (tensor {tensor}, value "
                              f"{short_repr(values.get(name))})",
                              "fix the value in the recipe") from None
        raise usage_error("parameters", f"{msg} (tensor {tensor})",
                          "fix the value in the recipe") from None
    return params.model_dump(by_alias=True)


def _culprit(method: Method, values: dict[str, Any], n_models: int) -> int | None:
    """The first input model whose per-model values alone fail validation, if any."""
    per_model = {p.name for p in method.params if p.per_model}
    for k in range(n_models):
        one = {n: (v[k],) if n in per_model else v for n, v in values.items()}
        try:
            method.make_params(one)
        except ValidationError:
            return k
    return None


def parameter_places(cfg: MergeConfiguration) -> list[tuple[str, Parameters | None, bool]]:
    """Every place a recipe sets parameters: (its YAML path, the parameters, whether the
    place is one model's)."""
    return [("parameters", cfg.parameters, False)] + [
        (f"slices[{i}].parameters", s.parameters, False) for i, s in enumerate(cfg.slices or [])
    ] + [
        (f"models[{i}].parameters", m.parameters, True) for i, m in enumerate(cfg.models or [])
    ] + [
        (f"slices[{i}].sources[{j}].parameters", src.parameters, True)
        for i, s in enumerate(cfg.slices or []) for j, src in enumerate(s.sources)
    ] + [
        (f"input_model_parameters.{k}", v, True)
        for k, v in (cfg.input_model_parameters or {}).items()
    ]


def misplaced_globals(method: Method, cfg: MergeConfiguration) -> list[str]:
    """Warnings for whole-merge parameters set for one model, where they have no effect."""
    globals_ = {p.name for p in method.params if not p.per_model}
    return [
        f"{where}.{name}: {name!r} applies to the whole merge, so it is ignored here; set it "
        "under the top-level (or slice) parameters"
        for where, params, one_model in parameter_places(cfg) if one_model
        for name in sorted(set(params or {}) & globals_)
    ]


def foreign_parameters(method: Method, cfg: MergeConfiguration) -> list[str]:
    """Warnings for parameters the method does not take but another method does; mergekit
    0.1.x ignores them, and so does the merge."""
    from mergekit.recipe_checks import other_methods_parameters

    foreign = other_methods_parameters(method)
    return [
        f"{where}.{yaml_key(name)}: '{method.name}' takes no parameter {name!r}, so it is "
        "ignored; remove it, or use a method that takes it"
        for where, params, _ in parameter_places(cfg)
        for name in sorted(set(params or {}) & foreign)
    ]


def unusual_values(method: Method, cfg: MergeConfiguration) -> list[str]:
    """Warnings for values outside a parameter's usual range (``UsualRange``), once for
    each place the recipe sets one: a scalar, a gradient's anchor, a filter entry's value."""
    warnings = []
    for place, params, one_model in parameter_places(cfg):
        for spec in method.params:
            usual = spec.usual_range
            if usual is None or not params or spec.name not in params or (
                    one_model and not spec.per_model):  # ignored there (misplaced_globals)
                continue
            setting = params[spec.name]
            # one entry without a filter is a value written directly, as recipe_to_plain does
            direct = len(setting) == 1 and setting[0].filter is None
            for k, cond in enumerate(setting):
                where = f"{place}.{yaml_key(spec.name)}" + ("" if direct else f"[{k}].value")
                gradient = isinstance(cond.value, tuple)
                for i, v in enumerate(cond.value if gradient else (cond.value,)):
                    if (isinstance(v, int | float) and not isinstance(v, bool)
                            and not usual.low <= v <= usual.high):
                        warnings.append(
                            f"{where}{f'[{i}]' if gradient else ''}: {short_repr(v)} is outside "
                            f"[{usual.low:g}, {usual.high:g}]: {usual.effect}; give a value in "
                            "that range unless this is meant")
    return warnings
