"""Random methods: each output tensor draws from its own stream, seeded by --random-seed and
the tensor's name, so results repeat exactly and do not depend on tensor order."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import load_state

from mergekit import MergeOptions, run_merge
from mergekit.config import parse_config
from mergekit.methods.registry import get_method
from mergekit.plan import tensor_seed

WEIGHTS, DENSITIES = (1.0, 0.5), (0.5, 0.5)


def dare_recipe(models: list[Path]) -> dict:
    a, b, c = models
    return {
        "merge_method": "dare_ties",
        "base_model": str(a),
        "models": [
            {"model": str(b), "parameters": {"weight": WEIGHTS[0], "density": DENSITIES[0]}},
            {"model": str(c), "parameters": {"weight": WEIGHTS[1], "density": DENSITIES[1]}},
        ],
    }


def sliced_recipe(models: list[Path], ranges: list[tuple[int, int]]) -> dict:
    """The same merge as dare_recipe, over the given source layer ranges."""
    a, b, c = models

    def sources(r: tuple[int, int]) -> list[dict]:
        return [
            {"model": str(a), "layer_range": list(r)},
            {"model": str(b), "layer_range": list(r),
             "parameters": {"weight": WEIGHTS[0], "density": DENSITIES[0]}},
            {"model": str(c), "layer_range": list(r),
             "parameters": {"weight": WEIGHTS[1], "density": DENSITIES[1]}},
        ]

    return {"merge_method": "dare_ties", "base_model": str(a),
            "slices": [{"sources": sources(r)} for r in ranges]}


def merge_with_plan(recipe: dict, out: Path, **options: object):
    plan = run_merge(parse_config(recipe), out, MergeOptions(quiet=True, **options))
    return plan, load_state(out)


def direct(models: list[Path], source_name: str, seed: int) -> torch.Tensor:
    """dare_ties run by hand on the source tensors, with the given seed."""
    a, b, c = (load_state(m)[source_name] for m in models)
    method = get_method("dare_ties")
    params = method.make_params({"weight": WEIGHTS, "density": DENSITIES, "seed": seed})
    return method.fn([b, c], a, params)


def test_same_seed_gives_identical_bytes(llama_models, merge):
    first = merge(dare_recipe(llama_models), random_seed=7)
    second = merge(dare_recipe(llama_models), random_seed=7)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_other_seed_gives_other_weights(llama_models, merge):
    first = load_state(merge(dare_recipe(llama_models), random_seed=7))
    other = load_state(merge(dare_recipe(llama_models), random_seed=8))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(first[name], other[name])


def test_unset_seed_is_seed_zero(llama_models, merge):
    unset = merge(dare_recipe(llama_models))
    zero = merge(dare_recipe(llama_models), random_seed=0)
    assert (unset / "model.safetensors").read_bytes() == (zero / "model.safetensors").read_bytes()


def test_plan_seeds_come_from_seed_and_name(llama_models, tmp_path):
    plan, _ = merge_with_plan(dare_recipe(llama_models), tmp_path / "out", random_seed=42)
    seeds = {}
    for job in plan.jobs:
        assert job.params["seed"] == tensor_seed(42, job.output_name), job.output_name
        seeds[job.output_name] = job.params["seed"]
    assert len(set(seeds.values())) == len(seeds)  # one stream per tensor
    assert tensor_seed(42, "lm_head.weight") != tensor_seed(43, "lm_head.weight")
    assert 0 <= tensor_seed(42, "lm_head.weight") < 2**63


def test_deterministic_methods_get_no_seed(llama_models, tmp_path):
    recipe = dare_recipe(llama_models) | {"merge_method": "ties"}
    plan, _ = merge_with_plan(recipe, tmp_path / "out", random_seed=42)
    assert all("seed" not in job.params for job in plan.jobs)


def test_results_do_not_depend_on_tensor_order(llama_models, tmp_path):
    # the two-layer merge puts the final norm and head at other positions of the plan
    full_plan, full = merge_with_plan(dare_recipe(llama_models), tmp_path / "full",
                                      random_seed=3)
    part_plan, part = merge_with_plan(sliced_recipe(llama_models, [(0, 2)]),
                                      tmp_path / "part", random_seed=3)

    def position(plan, name: str) -> int:
        return [j.output_name for j in plan.jobs].index(name)

    assert position(full_plan, "lm_head.weight") != position(part_plan, "lm_head.weight")
    assert len(part) < len(full)
    for name, tensor in part.items():
        assert torch.equal(tensor, full[name]), name


def test_result_equals_the_method_run_with_the_tensor_seed(llama_models, tmp_path):
    # slices in reverse order: output layer 2 comes from source layer 0
    _, out = merge_with_plan(sliced_recipe(llama_models, [(2, 4), (0, 2)]), tmp_path / "out",
                             random_seed=11)
    cases = [
        ("model.layers.2.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"),
        ("lm_head.weight", "lm_head.weight"),
    ]
    for out_name, source_name in cases:
        expected = direct(llama_models, source_name, tensor_seed(11, out_name))
        assert torch.equal(out[out_name], expected), out_name
        if out_name != source_name:  # the seed of the source tensor's name gives other bits
            by_source_name = direct(llama_models, source_name, tensor_seed(11, source_name))
            assert not torch.equal(out[out_name], by_source_name), out_name
