"""mergekit-layershuffle: pick each layer's source model at random, by weight."""

from __future__ import annotations

import math
import random
from typing import Any


def shuffle_recipe(models: list[str], weights: list[float], num_layers: int,
                   seed: int | None) -> dict[str, Any]:
    """A passthrough recipe: layer i from a model drawn with probability ~ its weight;
    consecutive layers from one model form one slice."""
    rng = random.Random(seed)
    picks = rng.choices(range(len(models)), weights=weights, k=num_layers)
    slices: list[dict[str, Any]] = []
    start = 0
    for i in range(1, num_layers + 1):
        if i == num_layers or picks[i] != picks[start]:
            model = models[picks[start]]
            slices.append({"sources": [{"model": model, "layer_range": [start, i]}]})
            start = i
    return {"merge_method": "passthrough", "slices": slices}


def layershuffle_from_models(models: list[str], weights: list[float], seed: int | None,
                             cache_dir: str | None) -> dict[str, Any]:
    """Check the flags, read each model's layer count from its headers, draw the recipe."""
    from mergekit.architecture import find_layers
    from mergekit.errors import usage_error
    from mergekit.io.adapter import open_input
    from mergekit.io.safetensors_file import SafetensorsReader
    from mergekit.refs import parse_model_reference

    if len(models) < 1:
        raise usage_error("--model", "no model given", "give --model at least once")
    if len(weights) != len(models):
        raise usage_error("--weight", f"given {len(weights)} times for {len(models)} --model",
                          "give one --weight per --model, in order")
    for w in weights:
        if not math.isfinite(w):
            raise usage_error("--weight", f"{w} is not a finite number",
                              "give a non-negative number")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise usage_error("--weight", "weights must be non-negative with a positive sum",
                          "fix the weights")
    if math.isinf(sum(weights)):
        raise usage_error("--weight", "the weights add up past the largest float",
                          "give smaller weights (only their ratios matter)")
    counts = {}
    reader = SafetensorsReader()
    try:
        for name in models:
            try:
                ref = parse_model_reference(name)
            except ValueError as exc:
                raise usage_error("--model", str(exc)) from None
            source = open_input(ref, reader, cache_dir)
            counts[name] = find_layers(source.names, source.config).num_layers
    finally:
        reader.close()
    if len(set(counts.values())) != 1:
        listing = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise usage_error("--model", f"the models have different layer counts ({listing})",
                          "layershuffle needs models of the same depth")
    return shuffle_recipe(models, weights, next(iter(counts.values())), seed)
