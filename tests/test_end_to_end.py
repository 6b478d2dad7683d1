"""Merged outputs load in transformers and run; structure, dtypes and tied heads survive."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import build_llama, load_state, read_json


def load_and_run(out: Path, vocab: int) -> torch.nn.Module:
    """Load ``out`` with AutoModelForCausalLM and run a forward pass on a few tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out).float().eval()
    ids = torch.tensor([[1, 5, 9, 2, 7]]) % vocab
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 5, vocab)
    assert torch.isfinite(logits).all()
    return model


def slerp_reference(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation written out from the formula, in float64."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = float(torch.dot(a64 / a64.norm(), b64 / b64.norm()))
    if abs(cos) > 0.9995:
        out = (1 - t) * a64 + t * b64
    else:
        theta = math.acos(cos)
        out = (math.sin((1 - t) * theta) * a64 + math.sin(t * theta) * b64) / math.sin(theta)
    return out.reshape(a.shape).float()


def test_llama_linear_loads_and_runs(llama_models, merge):
    a, b, c = llama_models
    out = merge({"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 2.0}},
        {"model": str(b), "parameters": {"weight": 1.0}},
        {"model": str(c), "parameters": {"weight": 1.0}}]})
    model = load_and_run(out, vocab=64)
    A, B, C = load_state(a), load_state(b), load_state(c)
    expected = (2 * A["lm_head.weight"] + B["lm_head.weight"] + C["lm_head.weight"]) / 4
    torch.testing.assert_close(model.lm_head.weight.detach(), expected)


def test_gpt2_tied_slerp_loads_and_has_no_head_tensor(gpt2_models, merge):
    a, b = gpt2_models
    out = merge({"merge_method": "slerp", "base_model": str(a),
                 "models": [{"model": str(a)}, {"model": str(b)}],
                 "parameters": {"t": 0.3}})
    state = load_state(out)
    assert not any(name.startswith("lm_head") for name in state)
    assert set(state) == set(load_state(a))
    model = load_and_run(out, vocab=64)
    wte = "transformer.wte.weight"
    expected = slerp_reference(load_state(a)[wte], load_state(b)[wte], 0.3)
    torch.testing.assert_close(state[wte], expected, atol=1e-5, rtol=1e-4)
    # the loaded head is the (merged) embedding
    assert torch.equal(model.lm_head.weight.detach(), state[wte])
    assert read_json(out / "config.json")["n_layer"] == 3


def ties_reference(base: torch.Tensor, others: list[torch.Tensor],
                   weights: list[float]) -> torch.Tensor:
    """TIES with density 1, sign by weighted sum, normalised by the agreeing weights."""
    deltas = torch.stack([w * (x - base) for x, w in zip(others, weights)])
    sign = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(deltas) == sign) & (deltas != 0)
    kept = torch.where(agree, deltas, 0.0).sum(0)
    w = torch.tensor(weights).view(-1, *[1] * base.dim())
    divisor = torch.where(agree, w, 0.0).sum(0)
    divisor = torch.where(divisor == 0, 1.0, divisor)
    return base + kept / divisor


def test_neox_ties_loads_and_runs(neox_models, tmp_path, merge):
    from conftest import build_neox

    base = build_neox(tmp_path / "neox-base", seed=99)
    a, b = neox_models
    out = merge({"merge_method": "ties", "base_model": str(base), "models": [
        {"model": str(base)},
        {"model": str(a), "parameters": {"weight": 0.7, "density": 1.0}},
        {"model": str(b), "parameters": {"weight": 0.3, "density": 1.0}}]})
    load_and_run(out, vocab=64)
    S, A, B, Out = load_state(base), load_state(a), load_state(b), load_state(out)
    assert set(Out) == set(S)
    for name in ("gpt_neox.layers.1.attention.query_key_value.weight", "embed_out.weight"):
        expected = ties_reference(S[name], [A[name], B[name]], [0.7, 0.3])
        torch.testing.assert_close(Out[name], expected, atol=1e-5, rtol=1e-4)


def test_passthrough_slices_renumber_layers(llama_models, merge):
    a, b, _ = llama_models
    out = merge({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 4]}]}]})
    A, B, Out = load_state(a), load_state(b), load_state(out)
    origin = [(A, 0), (A, 1), (B, 1), (B, 2), (B, 3)]  # output layer k <- (model, layer)
    suffixes = [n.removeprefix("model.layers.0.") for n in A if n.startswith("model.layers.0.")]
    assert len(suffixes) == 9
    for k, (src, layer) in enumerate(origin):
        for suffix in suffixes:
            assert torch.equal(Out[f"model.layers.{k}.{suffix}"],
                               src[f"model.layers.{layer}.{suffix}"]), (k, suffix)
    assert not any(n.startswith("model.layers.5.") for n in Out)
    # embeddings from the first slice's model, final norm and head from the last slice's
    assert torch.equal(Out["model.embed_tokens.weight"], A["model.embed_tokens.weight"])
    assert torch.equal(Out["model.norm.weight"], B["model.norm.weight"])
    assert torch.equal(Out["lm_head.weight"], B["lm_head.weight"])
    assert read_json(out / "config.json")["num_hidden_layers"] == 5
    model = load_and_run(out, vocab=64)
    assert len(model.model.layers) == 5


@pytest.mark.parametrize(("key", "dtype"), [("out_dtype", "bfloat16"), ("dtype", "float16")])
def test_output_dtype(llama_models, merge, key, dtype):
    a, b, _ = llama_models
    out = merge({"merge_method": "linear", key: dtype, "models": [
        {"model": str(a), "parameters": {"weight": 1.0}},
        {"model": str(b), "parameters": {"weight": 3.0}}]})
    want = getattr(torch, dtype)
    A, B, Out = load_state(a), load_state(b), load_state(out)
    assert {t.dtype for t in Out.values()} == {want}
    assert read_json(out / "config.json")["torch_dtype"] == dtype
    for name in A:
        expected = ((A[name] + 3 * B[name]) / 4).to(want)  # float32 math, one cast
        diff = (Out[name].float() - expected.float()).abs()
        ulp = torch.finfo(want).eps * expected.float().abs().clamp(min=1e-6)
        assert (diff <= ulp).all(), name
    load_and_run(out, vocab=64)


def test_input_dtype_kept_without_dtype(tmp_path, merge):
    a = build_llama(tmp_path / "a", seed=1, dtype=torch.bfloat16)
    b = build_llama(tmp_path / "b", seed=2, dtype=torch.bfloat16)
    out = merge({"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 1.0}},
        {"model": str(b), "parameters": {"weight": 1.0}}]})
    assert {t.dtype for t in load_state(out).values()} == {torch.bfloat16}
    assert read_json(out / "config.json")["torch_dtype"] == "bfloat16"


def test_tied_llama_output_has_no_head_tensor(tmp_path, merge):
    a = build_llama(tmp_path / "a", seed=1, tied=True)
    b = build_llama(tmp_path / "b", seed=2, tied=True)
    out = merge({"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 1.0}},
        {"model": str(b), "parameters": {"weight": 1.0}}]})
    state = load_state(out)
    assert "lm_head.weight" not in state
    assert read_json(out / "config.json")["tie_word_embeddings"] is True
    model = load_and_run(out, vocab=64)
    assert torch.equal(model.lm_head.weight.detach(), state["model.embed_tokens.weight"])


def test_bin_input_merges(tmp_path, llama_models, merge):
    binary = build_llama(tmp_path / "bin", seed=7, safe=False)
    assert (binary / "pytorch_model.bin").is_file()
    assert not list(binary.glob("*.safetensors"))
    a = llama_models[0]
    out = merge({"merge_method": "linear", "models": [
        {"model": str(binary), "parameters": {"weight": 1.0}},
        {"model": str(a), "parameters": {"weight": 1.0}}]})
    Bn, A, Out = load_state(binary), load_state(a), load_state(out)
    assert (out / "model.safetensors").is_file()
    for name in A:
        torch.testing.assert_close(Out[name], (Bn[name] + A[name]) / 2)
    load_and_run(out, vocab=64)


def test_python_api(tmp_path, llama_models):
    from mergekit import MergeConfiguration, MergeError, MergeOptions, run_merge

    a, b, _ = llama_models
    config = MergeConfiguration.model_validate({
        "merge_method": "slerp", "base_model": str(a),
        "models": [{"model": str(a)}, {"model": str(b)}],
        "parameters": {"t": [{"filter": "mlp", "value": 0.0}, {"value": 1.0}]}})
    out = tmp_path / "api-out"
    plan = run_merge(config, out, MergeOptions(quiet=True, write_model_card=False))
    assert plan.num_layers == 4
    assert len(plan.jobs) == len(load_state(a))
    A, B, Out = load_state(a), load_state(b), load_state(out)
    name = "model.layers.2.mlp.up_proj.weight"
    torch.testing.assert_close(Out[name], A[name])  # t = 0 -> base
    name = "model.layers.2.self_attn.v_proj.weight"
    torch.testing.assert_close(Out[name], B[name], atol=1e-5, rtol=1e-4)  # t = 1 -> other
    assert not (out / "README.md").exists()

    with pytest.raises(MergeError) as info:
        run_merge(config, a, MergeOptions(quiet=True))
    assert info.value.exit_code == 2
    assert "overlaps the input model" in str(info.value)


def test_dry_run_through_the_api(tmp_path, llama_models):
    from mergekit import MergeConfiguration, MergeOptions, run_merge

    a, b, _ = llama_models
    config = MergeConfiguration.model_validate({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(b), "layer_range": [3, 4]}]}]})
    out = tmp_path / "nothing"
    plan = run_merge(config, out, MergeOptions(quiet=True, dry_run=True))
    assert plan.num_layers == 4
    assert [m for m, _ in plan.layer_origins] == [str(a)] * 3 + [str(b)]
    assert not out.exists()


@pytest.fixture(scope="module")
def models_with_integer_tensors(tmp_path_factory, llama_models) -> list[Path]:
    """Copies of two test models with an int64 buffer (different in each) and a bool
    mask."""
    import shutil

    from safetensors.torch import save_file

    folders = []
    for k, model in enumerate(llama_models[:2]):
        folder = tmp_path_factory.mktemp("ints") / model.name
        shutil.copytree(model, folder)
        state = load_state(folder)
        state["model.position_ids"] = torch.arange(8, dtype=torch.int64) * (k + 1) + 2**40
        state["model.layers.0.attn_mask"] = torch.arange(12).reshape(3, 4) % (k + 2) == 0
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        folders.append(folder)
    return folders


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_integer_tensors_are_copied_exactly(engine, models_with_integer_tensors, merge,
                                            monkeypatch):
    """Integer and bool tensors are not merged: they come from the first model, bit for
    bit and in their dtype, while the float tensors around them are merged and cast."""
    from safetensors import safe_open

    import mergekit.run as run

    # "numpy": the engine run.py picks for linear on the CPU; today it picks torch for a model
    # with integer tensors (numpy_can_run takes float jobs only), so both runs are torch's
    if engine == "torch":
        monkeypatch.setattr(run, "NUMPY_ENGINE", False)
    a, b = models_with_integer_tensors
    out = merge({"merge_method": "linear", "dtype": "bfloat16", "models": [
        {"model": str(a), "parameters": {"weight": 1.0}},
        {"model": str(b), "parameters": {"weight": 3.0}}]})
    A, B, Out = load_state(a), load_state(b), load_state(out)
    assert Out.keys() == A.keys()
    for name in ("model.position_ids", "model.layers.0.attn_mask"):
        assert Out[name].dtype == A[name].dtype and torch.equal(Out[name], A[name]), name
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_slice("model.position_ids").get_dtype() == "I64"
        assert f.get_slice("model.layers.0.attn_mask").get_dtype() == "BOOL"
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(Out[name], ((A[name] + 3 * B[name]) / 4).to(torch.bfloat16))
