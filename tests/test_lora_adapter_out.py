"""AdapterOutput: the files load with peft, and merging gives base + B @ A computed here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mergekit.lora.adapter_out import AdapterOutput

peft = pytest.importorskip("peft")


def tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                      num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2)
    return LlamaForCausalLM(cfg).eval()


def weights(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


# module -> rank: different ranks, so rank_pattern and alpha_pattern are needed
LINEAR = {"model.layers.0.self_attn.q_proj": 3, "model.layers.1.self_attn.v_proj": 5,
          "model.layers.1.mlp.down_proj": 1, "lm_head": 4}
EMBED_RANK = 2


def written_adapter(folder: Path, base_weights: dict[str, np.ndarray], dtype: str = "float32"
                    ) -> dict[str, np.ndarray]:
    """Writes an adapter of random factors; returns the weights expected after merging."""
    rng = np.random.default_rng(1)
    out = AdapterOutput("tiny-llama", dtype)
    expected = dict(base_weights)
    for module, r in LINEAR.items():
        rows, cols = base_weights[module + ".weight"].shape
        a, b = rng.standard_normal((r, cols)) * 0.1, rng.standard_normal((rows, r)) * 0.1
        out.add_linear(module, a, b)
        expected[module + ".weight"] = base_weights[module + ".weight"] + b @ a
    vocab, dim = base_weights["model.embed_tokens.weight"].shape
    a, b = rng.standard_normal((EMBED_RANK, vocab)), rng.standard_normal((dim, EMBED_RANK))
    out.add_embedding("model.embed_tokens", a, b)
    expected["model.embed_tokens.weight"] = base_weights["model.embed_tokens.weight"] + (b @ a).T
    norm = rng.standard_normal(dim)
    out.add_full("model.norm.weight", norm)
    expected["model.norm.weight"] = norm
    # rank 0: left out
    out.add_linear("model.layers.0.mlp.up_proj", np.zeros((0, dim)), np.zeros((32, 0)))
    out.write(folder, card="# tiny adapter\n")
    return expected


def test_merged_adapter_gives_base_plus_b_a(tmp_path):
    base = tiny_llama()
    base_weights = weights(base)
    expected = written_adapter(tmp_path, base_weights)
    assert (tmp_path / "README.md").read_text() == "# tiny adapter\n"
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    merged = weights(loaded.merge_and_unload())
    assert merged.keys() == expected.keys()
    for name, want in expected.items():
        np.testing.assert_allclose(merged[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
    changed = {n for n in expected if not np.array_equal(expected[n], base_weights[n])}
    assert changed == {m + ".weight" for m in LINEAR} | {"model.embed_tokens.weight",
                                                         "model.norm.weight"}


def test_config_scales_every_module_by_one(tmp_path):
    written_adapter(tmp_path, weights(tiny_llama()))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == config["lora_alpha"] == 5
    assert config["rank_pattern"] == config["alpha_pattern"] == {
        "lm_head": 4, "model.embed_tokens": 2, "model.layers.0.self_attn.q_proj": 3,
        "model.layers.1.mlp.down_proj": 1}
    assert sorted(config["target_modules"]) == sorted([*LINEAR, "model.embed_tokens"])
    assert config["modules_to_save"] == ["model.norm"]
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert not config["use_rslora"] and not config["fan_in_fan_out"] and config["bias"] == "none"


def saved_keys(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(folder / "adapter_model.safetensors", "np") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_keys_are_the_ones_peft_saves(tmp_path):
    """peft's own save of the same modules (less the embedding's base layer, which peft adds
    for a targeted embedding) names the tensors as we do, with the same shapes."""
    ours = tmp_path / "ours"
    ours.mkdir()
    written_adapter(ours, weights(tiny_llama()))
    config = peft.LoraConfig(**{k: v for k, v in json.loads(
        (ours / "adapter_config.json").read_text()).items() if k != "peft_type"})
    theirs = tmp_path / "theirs"
    peft.get_peft_model(tiny_llama(), config).save_pretrained(theirs)
    keys = {k: s for k, s in saved_keys(theirs).items() if ".base_layer." not in k}
    assert keys == saved_keys(ours)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_narrow_dtypes(tmp_path, dtype):
    from safetensors import safe_open

    expected = written_adapter(tmp_path, weights(base := tiny_llama()), dtype)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {f"torch.{dtype}"}
    merged = weights(peft.PeftModel.from_pretrained(base, tmp_path).merge_and_unload())
    for name, want in expected.items():
        np.testing.assert_allclose(merged[name], want, rtol=2e-2, atol=2e-2, err_msg=name)


def test_bad_inputs(tmp_path):
    out = AdapterOutput("m")
    with pytest.raises(ValueError, match="multiply"):
        out.add_linear("x", np.zeros((2, 3)), np.zeros((4, 3)))
    out.add_linear("x", np.ones((1, 3)), np.ones((4, 1)))
    out.add_full("x.bias", np.ones(4))
    with pytest.raises(ValueError, match="both a LoRA module and replaced whole"):
        out.write(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        AdapterOutput("m", "int8")
