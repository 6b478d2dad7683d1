"""mergekit-legacy flags -> a merge recipe."""

from __future__ import annotations

from typing import Any

from mergekit.errors import usage_error


def _per_model(flag: str, values: list[float], count: int) -> list[float | None]:
    """One value for all merged models, or one per --merge, in order."""
    _check_numbers(flag, values)
    if not values:
        return [None] * count
    if len(values) == 1:
        return values * count
    if len(values) == count:
        return list(values)
    raise usage_error(
        flag, f"given {len(values)} times for {count} --merge models",
        f"give it once (for all) or {count} times (once per --merge, in order)")


def _check_numbers(flag: str, values: list[float]) -> None:
    """Values the recipe refuses (NaN, inf, past float32) named by the flag that gave them."""
    from mergekit.recipe_fields import float32_error

    for v in values:
        problem = float32_error(v)
        if problem:
            raise usage_error(flag, problem)


def legacy_recipe(
    *,
    base_model: str | None,
    merges: list[str],
    weights: list[float],
    densities: list[float],
    method: str,
    normalize: bool,
    int8_mask: bool,
    bf16: bool,
    naive_count: bool,
) -> dict[str, Any]:
    from mergekit.methods.registry import get_method

    m = get_method(method, where="--method")
    if not merges:
        raise usage_error("--merge", "no model to merge", "give --merge MODEL at least once")
    names = {p.name for p in m.params}
    if m.base == "required" and not base_model and method != "slerp":
        raise usage_error("--base-model", f"method {method!r} needs a base model",
                          "give --base-model")
    recipe: dict[str, Any] = {"merge_method": method}
    if base_model:
        recipe["base_model"] = base_model
    params: dict[str, Any] = {}
    if densities and "density" not in names:
        raise usage_error("--density", f"method {method!r} takes no density",
                          "drop --density or choose a sparsifying method such as ties")
    if method == "slerp":
        if len(weights) != 1:
            raise usage_error("--weight", f"slerp takes exactly one --weight (its t), given "
                              f"{len(weights)}", "give --weight T once")
        if len(merges) != 1 or not base_model:
            raise usage_error("--merge", "slerp interpolates --base-model and one --merge "
                              "model", "give --base-model and exactly one --merge")
        recipe["models"] = [{"model": base_model}, {"model": merges[0]}]
        _check_numbers("--weight", weights)
        params["t"] = weights[0]
    else:
        if weights and "weight" not in names:
            raise usage_error("--weight", f"method {method!r} takes no weight",
                              "drop --weight or choose a method that weighs its models")
        weight_spec = m.param("weight")
        if not weights and weight_spec is not None and weight_spec.required:
            raise usage_error(
                "--weight", f"not given; method {method!r} needs a weight for each of the "
                f"{len(merges)} --merge models",
                f"give it once (for all) or {len(merges)} times (once per --merge, in order)")
        per_weight = _per_model("--weight", weights, len(merges))
        per_density = _per_model("--density", densities, len(merges))
        models = []
        for model, w, d in zip(merges, per_weight, per_density):
            p: dict[str, Any] = {}
            if w is not None:
                p["weight"] = w
            if d is not None:
                p["density"] = d
            models.append({"model": model, "parameters": p} if p else {"model": model})
        recipe["models"] = models
    if "normalize" in names:
        params["normalize"] = normalize
    if int8_mask and "int8_mask" in names:
        params["int8_mask"] = True
    if naive_count:
        if "consensus" not in names:
            raise usage_error("--naive-count", f"method {method!r} elects no sign",
                              "use it with ties, dare_ties, breadcrumbs_ties or della")
        params["consensus"] = "count"
    if params:
        recipe["parameters"] = params
    if bf16:
        recipe["dtype"] = "bfloat16"
    return recipe
