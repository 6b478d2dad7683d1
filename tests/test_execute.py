"""Executing tensor jobs: chunked execution gives the same bytes as whole-tensor execution;
the thread count of chunk passes."""

from pathlib import Path

import pytest
from conftest import load_state

import mergekit.execute as execute_module

RECIPES = {
    "linear": lambda a, b, c: {"merge_method": "linear", "models": [
        {"model": a, "parameters": {"weight": 0.3}}, {"model": b, "parameters": {"weight": 0.7}}]},
    "ties": lambda a, b, c: {"merge_method": "ties", "base_model": a, "models": [
        {"model": b, "parameters": {"weight": 0.5}}, {"model": c, "parameters": {"weight": 0.5}}]},
    "ties_sparse": lambda a, b, c: {"merge_method": "ties", "base_model": a,
                                    "parameters": {"rescale": True}, "models": [
        {"model": b, "parameters": {"weight": 0.5, "density": 0.3}},
        {"model": c, "parameters": {"weight": 0.7, "density": 0.6}}]},
    "passthrough": lambda a, b, c: {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}],
         "parameters": {"scale": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}}]},
    "slerp": lambda a, b, c: {"merge_method": "slerp", "base_model": a, "models": [
        {"model": a}, {"model": b}], "parameters": {"t": [0.1, 0.9]}},
    "dare_ties": lambda a, b, c: {"merge_method": "dare_ties", "base_model": a, "models": [
        {"model": b, "parameters": {"weight": 0.5, "density": 0.4}},
        {"model": c, "parameters": {"weight": 0.5, "density": 0.7}}]},
    "della_linear": lambda a, b, c: {"merge_method": "della_linear", "base_model": a,
                                     "models": [
        {"model": b, "parameters": {"weight": 0.5, "density": 0.4, "epsilon": 0.1}},
        {"model": c, "parameters": {"weight": 0.5, "density": 0.7}}]},
    "task_arithmetic": lambda a, b, c: {"merge_method": "task_arithmetic", "base_model": a,
                                        "dtype": "bfloat16", "models": [
        {"model": b, "parameters": {"weight": 0.5}}, {"model": c, "parameters": {"weight": 0.2}}]},
}


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("cache_bytes", [256 * 1024**2, 0], ids=["cached", "reread"])
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_row_chunks_give_identical_bytes(name, cache_bytes, llama_models, merge, monkeypatch):
    recipe = RECIPES[name](*(str(m) for m in llama_models))
    whole = merge(recipe)
    monkeypatch.setattr(execute_module, "CHUNK_ELEMENTS", 40)  # forces several chunks per tensor
    monkeypatch.setattr(execute_module, "PREPARE_CACHE_BYTES", cache_bytes)
    calls = []
    real = execute_module._row_chunks
    monkeypatch.setattr(execute_module, "_row_chunks", lambda *a: calls.append(r := real(*a)) or r)
    chunked = merge(recipe)
    assert any(len(c) > 1 for c in calls), "no tensor was split into chunks"
    assert _bytes(whole) == _bytes(chunked)
    assert load_state(whole).keys() == load_state(chunked).keys()


def test_chunk_passes_leave_one_core_to_the_output_threads(llama_models, merge, monkeypatch):
    """Row-chunk passes run on one thread fewer than torch had; prepare passes and whole
    tensors use them all; the count is given back at the end."""
    import dataclasses

    import torch

    from mergekit.methods import registry

    real = registry.get_method("slerp")
    seen: dict[str, set[int]] = {"prepare": set(), "chunk": set(), "whole": set()}

    def prepare(chunks, params):
        seen["prepare"].add(torch.get_num_threads())
        return real.prepare(chunks, params)

    def fn(tensors, base, params):
        # with 40-element chunks every 2-D tensor is split; 1-D ones stay whole
        seen["chunk" if tensors[0].dim() > 1 else "whole"].add(torch.get_num_threads())
        return real.fn(tensors, base, params)

    monkeypatch.setitem(registry._METHODS, "slerp",
                        dataclasses.replace(real, fn=fn, prepare=prepare))
    monkeypatch.setattr(execute_module, "CHUNK_ELEMENTS", 40)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        merge(RECIPES["slerp"](*(str(m) for m in llama_models)))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert seen == {"prepare": {3}, "chunk": {2}, "whole": {3}}
