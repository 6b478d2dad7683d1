"""lora_cat: adapters of one base concatenated into one adapter, against peft's own
``add_weighted_adapter(..., combination_type="cat")`` and against the weighted sum of the
adapters' changes computed here."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import build_llama
from lora_models import make_adapter, merged
from safetensors.torch import load_file
from stopped_merges import merge_in_process

from mergekit.methods.lora_cat import LoraCatParams, lora_cat


def test_lora_cat_on_arrays_is_the_base_plus_weighted_changes():
    import numpy as np

    rng = np.random.default_rng(0)
    base, x, y = (rng.standard_normal((3, 4)).astype(np.float32) for _ in range(3))
    out = lora_cat([x, y], base, LoraCatParams(weight=(0.25, 2.0)))
    np.testing.assert_allclose(out, base + 0.25 * (x - base) + 2.0 * (y - base), rtol=1e-6)


@pytest.fixture()
def adapters(tmp_path):
    base = build_llama(tmp_path / "base", 1, layers=2)
    one = make_adapter(base, tmp_path / "a1", 21, r=2, lora_alpha=4,
                       target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 3})
    two = make_adapter(base, tmp_path / "a2", 22, r=4, lora_alpha=2, use_rslora=True,
                       target_modules=["v_proj", "o_proj"])
    return base, one, two


def recipe(base, tmp_path, weights=(0.3, 0.7)) -> dict:
    return {"merge_method": "lora_cat", "base_model": str(base), "models": [
        {"model": f"{base}+{tmp_path / 'a1'}", "parameters": {"weight": weights[0]}},
        {"model": f"{base}+{tmp_path / 'a2'}", "parameters": {"weight": weights[1]}}]}


def test_lora_cat_equals_peft_cat(tmp_path, adapters):
    from transformers import AutoModelForCausalLM

    base, one, two = adapters
    out = tmp_path / "cat"
    merge_in_process(recipe(base, tmp_path), out)
    config = json.loads((out / "adapter_config.json").read_text())
    factors = load_file(out / "adapter_model.safetensors")
    # v_proj is in both: rank 3 + 4
    v = [t for k, t in factors.items() if "layers.0.self_attn.v_proj.lora_A" in k]
    assert v and v[0].shape[0] == 7 and config["peft_type"] == "LORA"
    model = AutoModelForCausalLM.from_pretrained(base)
    ours = peft.PeftModel.from_pretrained(model, out).merge_and_unload().state_dict()

    theirs_model = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), tmp_path / "a1", adapter_name="a1")
    theirs_model.load_adapter(tmp_path / "a2", adapter_name="a2")
    theirs_model.add_weighted_adapter(["a1", "a2"], [0.3, 0.7], "cat",
                                      combination_type="cat")
    theirs_model.set_adapter("cat")
    theirs = theirs_model.merge_and_unload().state_dict()
    original = merged(base)
    for name, t in original.items():
        want = t + 0.3 * (one[name] - t) + 0.7 * (two[name] - t)
        assert torch.allclose(ours[name], want, rtol=1e-5, atol=1e-6), name
        assert torch.allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-6), name


def test_lora_cat_needs_adapters_of_the_base(tmp_path, adapters):
    base, _, _ = adapters
    bad = recipe(base, tmp_path)
    bad["models"][1]["model"] = str(base)
    with pytest.raises(Exception, match=r"models\[1\]\.model: .* is not an adapter of the base"):
        merge_in_process(bad, tmp_path / "out")
