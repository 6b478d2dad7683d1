"""Layer detection from tensor names and config.json, on models transformers builds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import build_llama
from safetensors import safe_open

from mergekit.architecture import (
    config_layer_count,
    embedding_name,
    find_layers,
    is_head_name,
    is_post_layer,
)


def names_and_config(folder: Path) -> tuple[list[str], dict]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    return names, json.loads((folder / "config.json").read_text())


LLAMA_SUFFIXES = (
    "input_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight",
    "mlp.up_proj.weight", "post_attention_layernorm.weight", "self_attn.k_proj.weight",
    "self_attn.o_proj.weight", "self_attn.q_proj.weight", "self_attn.v_proj.weight",
)


def test_llama(llama_models: list[Path]):
    layout = find_layers(*names_and_config(llama_models[0]))
    assert layout.prefix == "model.layers"
    assert layout.num_layers == 4
    assert layout.layer_suffixes == (LLAMA_SUFFIXES,) * 4
    assert set(layout.pre) == {"model.embed_tokens.weight"}
    assert set(layout.post) == {"model.norm.weight", "lm_head.weight"}
    assert layout.layer_name(3, "mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"


def test_gpt2_is_tied_and_has_no_head(gpt2_models: list[Path]):
    names, config = names_and_config(gpt2_models[0])
    layout = find_layers(names, config)
    assert layout.prefix == "transformer.h"
    assert layout.num_layers == 3
    suffixes = {f"{p}.{w}" for p in ("attn.c_attn", "attn.c_proj", "ln_1", "ln_2", "mlp.c_fc",
                                      "mlp.c_proj") for w in ("weight", "bias")}
    assert all(set(s) == suffixes for s in layout.layer_suffixes)
    assert set(layout.pre) == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert set(layout.post) == {"transformer.ln_f.weight", "transformer.ln_f.bias"}
    assert not any("lm_head" in n for n in names)
    assert embedding_name(names) == "transformer.wte.weight"


def test_gpt_neox(neox_models: list[Path]):
    layout = find_layers(*names_and_config(neox_models[0]))
    assert layout.prefix == "gpt_neox.layers"
    assert layout.num_layers == 3
    assert "attention.query_key_value.weight" in layout.layer_suffixes[2]
    assert set(layout.pre) == {"gpt_neox.embed_in.weight"}
    assert set(layout.post) == {
        "gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "embed_out.weight"}


def test_every_tensor_is_in_exactly_one_place(llama_models, gpt2_models, neox_models):
    for folder in (llama_models[0], gpt2_models[0], neox_models[0]):
        names, config = names_and_config(folder)
        layout = find_layers(names, config)
        in_layers = [layout.layer_name(i, s) for i in range(layout.num_layers)
                     for s in layout.layer_suffixes[i]]
        placed = in_layers + list(layout.pre) + list(layout.post)
        assert sorted(placed) == sorted(names), folder


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama(tmp_path_factory.mktemp("arch") / "tied", seed=5, layers=2, tied=True)


def test_tied_llama(tied_llama: Path):
    names, config = names_and_config(tied_llama)
    layout = find_layers(names, config)
    assert layout.num_layers == 2
    assert "lm_head.weight" not in names
    assert set(layout.post) == {"model.norm.weight"}
    assert embedding_name(names) == "model.embed_tokens.weight"


def test_layer_container_is_chosen_by_the_config_count():
    # a vision tower with 3 blocks beside a language model with 2 layers
    names = [f"vision.blocks.{i}.attn.weight" for i in range(3)]
    names += [f"language_model.layers.{i}.mlp.weight" for i in range(2)]
    names += ["language_model.embed.weight", "language_model.norm.weight"]
    layout = find_layers(names, {"num_hidden_layers": 2})
    assert layout.prefix == "language_model.layers"
    assert layout.num_layers == 2
    # without a count in config.json the container with most layers wins
    assert find_layers(names, {}).prefix == "vision.blocks"


def test_no_layers():
    layout = find_layers(["embed.weight", "lm_head.weight"], {})
    assert layout.num_layers == 0
    assert layout.pre == ("embed.weight",)
    assert layout.post == ("lm_head.weight",)


@pytest.mark.parametrize(("config", "expected"), [
    ({"num_hidden_layers": 32}, 32),
    ({"n_layer": 12}, 12),
    ({"num_layers": 24}, 24),
    ({"n_layers": 8}, 8),
    ({"text_config": {"num_hidden_layers": 40}, "vision_config": {"num_hidden_layers": 27}}, 40),
    ({"hidden_size": 16}, None),
])
def test_config_layer_count(config: dict, expected: int | None):
    assert config_layer_count(config) == expected


@pytest.mark.parametrize(("name", "post"), [
    ("model.norm.weight", True),
    ("lm_head.weight", True),
    ("embed_out.weight", True),
    ("transformer.ln_f.bias", True),
    ("gpt_neox.final_layer_norm.weight", True),
    ("model.embed_tokens.weight", False),
    ("transformer.wpe.weight", False),
    ("score.weight", True),
])
def test_is_post_layer(name: str, post: bool):
    assert is_post_layer(name) is post


@pytest.mark.parametrize(("name", "head"), [
    ("lm_head.weight", True),
    ("embed_out.weight", True),
    ("output.weight", True),
    ("model.norm.weight", False),
    ("model.embed_tokens.weight", False),
])
def test_is_head_name(name: str, head: bool):
    assert is_head_name(name) is head
