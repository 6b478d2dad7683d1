"""Find the layer structure of a model from its tensor names and config.json.

No table per architecture: the layer container is the dotted prefix followed by a
layer index (``model.layers.N.``, ``transformer.h.N.``, ``gpt_neox.layers.N.`` ...).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_LAYER_NAME = re.compile(r"^(.*?)\.(\d+)\.(.+)$")
# dotted name parts that mark a tensor as coming after the layers (final norm, output head)
_POST_PARTS = {
    "lm_head", "embed_out", "ln_f", "norm", "final_layernorm", "final_layer_norm",
    "final_norm", "output", "output_layer", "score", "head",
}
_EMBED_PARTS = ("embed_tokens", "wte", "embed_in", "word_embeddings", "tok_embeddings")


@dataclass(frozen=True)
class LayerLayout:
    prefix: str  # e.g. "model.layers"
    num_layers: int
    layer_suffixes: tuple[tuple[str, ...], ...]  # per layer: names after "prefix.N."
    pre: tuple[str, ...]  # non-layer tensors before the layers (embeddings)
    post: tuple[str, ...]  # non-layer tensors after the layers (final norm, head)

    def layer_name(self, layer: int, suffix: str) -> str:
        return f"{self.prefix}.{layer}.{suffix}"


def config_layer_count(config: dict[str, Any]) -> int | None:
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    text = config.get("text_config")
    return config_layer_count(text) if isinstance(text, dict) else None


def find_layers(names: Iterable[str], config: dict[str, Any]) -> LayerLayout:
    names = list(names)
    by_prefix: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name in names:
        m = _LAYER_NAME.match(name)
        if m:
            by_prefix[m.group(1)][int(m.group(2))].append(m.group(3))
    expected = config_layer_count(config)
    prefix = ""
    if by_prefix:
        def score(p: str) -> tuple[bool, int]:
            return (len(by_prefix[p]) == expected, len(by_prefix[p]))

        prefix = max(by_prefix, key=score)
    layers = by_prefix.get(prefix, {})
    count = (max(layers) + 1) if layers else 0
    suffixes = tuple(tuple(sorted(layers.get(i, []))) for i in range(count))
    in_layers = {f"{prefix}.{i}.{s}" for i in range(count) for s in suffixes[i]}
    rest = [n for n in names if n not in in_layers]
    post = tuple(n for n in rest if is_post_layer(n))
    pre = tuple(n for n in rest if not is_post_layer(n))
    return LayerLayout(prefix, count, suffixes, pre, post)


def is_post_layer(name: str) -> bool:
    parts = name.split(".")[:-1] or name.split(".")
    return any(p in _POST_PARTS for p in parts)


def embedding_name(names: Iterable[str]) -> str | None:
    """The input embedding matrix among ``names``, used as the head of tied models."""
    for name in names:
        if name.endswith(".weight") and any(p in name.split(".") for p in _EMBED_PARTS):
            return name
    return None


def is_head_name(name: str) -> bool:
    return name.split(".")[0] in ("lm_head", "embed_out") or name.startswith("output.")
