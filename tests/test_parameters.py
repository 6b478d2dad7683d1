"""Parameter values: gradients, {filter, value} lists, and the precedence of the five levels."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from mergekit.config import Conditional, parse_config
from mergekit.io.model import open_model
from mergekit.io.safetensors_file import SafetensorsReader
from mergekit.methods.registry import get_method
from mergekit.parameters import interpolate_gradient, resolve
from mergekit.plan import MergePlan, TensorJob, build_plan


@pytest.fixture
def reader() -> Iterator[SafetensorsReader]:
    r = SafetensorsReader()
    yield r
    r.close()


def plan_for(recipe: dict, reader: SafetensorsReader) -> MergePlan:
    cfg = parse_config(recipe)
    sources = {str(ref): open_model(ref, reader, None) for ref in cfg.referenced_models()}
    return build_plan(cfg, sources)


def job(plan: MergePlan, name: str) -> TensorJob:
    (found,) = [j for j in plan.jobs if j.output_name == name]
    return found


# -- gradients -------------------------------------------------------------------------------

@pytest.mark.parametrize(("t", "expected"), [
    (0.0, 2.0), (1.0, 6.0), (0.5, 4.0), (0.25, 3.0), (0.75, 5.0),
])
def test_two_anchors(t: float, expected: float):
    assert interpolate_gradient([2.0, 6.0], t) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("t", "expected"), [
    # anchors at t = 0, 0.5, 1
    (0.0, 1.0), (0.5, 3.0), (1.0, 2.0),
    (0.25, 2.0),  # halfway from 1 to 3
    (0.75, 2.5),  # halfway from 3 to 2
    (0.1, 1.4),  # a fifth of the way from 1 to 3
])
def test_three_anchors(t: float, expected: float):
    assert interpolate_gradient([1.0, 3.0, 2.0], t) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("t", "expected"), [
    # anchors at t = 0, 0.25, 0.5, 0.75, 1
    (0.0, 0.0), (0.25, 0.5), (0.5, 0.3), (0.75, 0.7), (1.0, 1.0),
    (0.125, 0.25), (0.375, 0.4), (0.625, 0.5), (0.875, 0.85),
])
def test_five_anchors(t: float, expected: float):
    gradient = [0.0, 0.5, 0.3, 0.7, 1.0]
    assert interpolate_gradient(gradient, t) == pytest.approx(expected, abs=1e-12)


def test_one_anchor_is_constant():
    assert [interpolate_gradient([0.7], t) for t in (0.0, 0.3, 1.0)] == [0.7, 0.7, 0.7]


def test_layer_positions_of_a_four_layer_slice():
    # layer i of 4 sits at t = i/3: pos 0, 2/3, 4/3, 2 over anchors [2, 4, 10]
    values = [interpolate_gradient([2.0, 4.0, 10.0], i / 3) for i in range(4)]
    assert values == pytest.approx([2.0, 2.0 + 2.0 * 2 / 3, 4.0 + 6.0 / 3, 10.0], abs=1e-12)


# -- filters -----------------------------------------------------------------------------------

def cond(value: object, flt: str | None = None) -> Conditional:
    return Conditional(filter=flt, value=value)


def test_first_matching_filter_wins():
    setting = (cond(1.0, "self_attn"), cond(2.0, "q_proj"), cond(3.0))
    levels = [{"w": setting}]
    assert resolve(levels, "w", "model.layers.0.self_attn.q_proj.weight", 0.0) == (True, 1.0)
    assert resolve(levels, "w", "model.layers.0.mlp.q_proj.weight", 0.0) == (True, 2.0)


def test_filterless_entry_matches_every_tensor():
    levels = [{"w": (cond(1.0, "mlp"), cond(3.0))}]
    assert resolve(levels, "w", "model.norm.weight", 0.0) == (True, 3.0)
    assert resolve(levels, "w", "lm_head.weight", 0.0) == (True, 3.0)


def test_filterless_entry_first_shadows_the_rest():
    levels = [{"w": (cond(3.0), cond(1.0, "mlp"))}]
    assert resolve(levels, "w", "model.layers.0.mlp.up_proj.weight", 0.0) == (True, 3.0)


def test_no_match_falls_through_to_the_next_level():
    levels = [{"w": (cond(1.0, "mlp"),)}, None, {}, {"w": (cond(5.0, "norm"),)}]
    assert resolve(levels, "w", "model.norm.weight", 0.0) == (True, 5.0)
    assert resolve(levels, "w", "model.embed_tokens.weight", 0.0) == (False, None)


def test_a_level_without_the_parameter_falls_through():
    levels = [{"other": (cond(9.0),)}, {"w": (cond(4.0),)}]
    assert resolve(levels, "w", "x.weight", 0.0) == (True, 4.0)


def test_filtered_gradient_is_interpolated_at_t():
    levels = [{"t": (cond((0.0, 1.0), "self_attn"), cond((1.0, 0.0), "mlp"), cond(0.5))}]
    assert resolve(levels, "t", "m.layers.1.self_attn.o_proj.weight", 0.25) == (True, 0.25)
    assert resolve(levels, "t", "m.layers.1.mlp.up_proj.weight", 0.25) == (True, 0.75)
    assert resolve(levels, "t", "m.layers.1.input_layernorm.weight", 0.25) == (True, 0.5)


def test_non_numeric_values_pass_through():
    levels = [{"consensus": (cond("count"),)}, {"normalize": (cond(False),)}]
    assert resolve(levels, "consensus", "x", 0.0) == (True, "count")
    assert resolve(levels, "normalize", "x", 0.0) == (True, False)


# -- precedence across the five levels, through the planner on real models -------------------

Q = "model.layers.{}.self_attn.q_proj.weight"
K = "model.layers.{}.self_attn.k_proj.weight"
UP = "model.layers.{}.mlp.up_proj.weight"
LN = "model.layers.{}.input_layernorm.weight"
EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


@pytest.fixture
def precedence_plan(llama_models: list[Path], reader: SafetensorsReader) -> MergePlan:
    a, b, c = (str(p) for p in llama_models)
    recipe = {
        "merge_method": "ties",
        "base_model": a,
        "slices": [
            {
                "sources": [
                    {"model": a, "layer_range": [0, 2]},
                    # level 1: the source
                    {"model": b, "layer_range": [0, 2],
                     "parameters": {"density": [{"filter": "q_proj", "value": 0.1}]}},
                    {"model": c, "layer_range": [0, 2], "parameters": {"weight": 0.5}},
                ],
                # level 2: the slice
                "parameters": {"density": [{"filter": "proj", "value": 0.2}],
                               "normalize": False},
            },
            {"sources": [{"model": a, "layer_range": [2, 4]}, {"model": b, "layer_range": [2, 4]},
                         {"model": c, "layer_range": [2, 4]}]},
        ],
        # level 3: input_model_parameters
        "input_model_parameters": {
            b: {"density": [{"filter": "layernorm", "value": 0.3},
                            {"filter": "k_proj", "value": 0.35}]},
        },
        # level 4: top-level; level 5: ties' default density of 1
        "parameters": {
            "weight": 1.0,
            "density": [{"filter": "embed", "value": 0.4}, {"filter": "layernorm", "value": 0.9},
                        {"filter": "mlp", "value": 0.45}],
            "lambda": 0.7,
        },
    }
    return plan_for(recipe, reader)


@pytest.mark.parametrize(("tensor", "density_b", "density_c"), [
    (Q.format(0), 0.1, 0.2),  # b: source beats slice; c: slice
    (K.format(1), 0.2, 0.2),  # b: slice beats input_model_parameters
    (UP.format(0), 0.2, 0.2),  # slice ("up_proj" contains "proj") beats top-level "mlp"
    (LN.format(1), 0.3, 0.9),  # b: input_model_parameters beats top-level; c: top-level
    (EMBED, 0.4, 0.4),  # no match above: top-level
    (NORM, 1.0, 1.0),  # nothing matches anywhere: the default
    (HEAD, 1.0, 1.0),
    # the second slice has no slice parameters
    (Q.format(2), 1.0, 1.0),  # b's source parameters were only for the first slice
    (K.format(3), 0.35, 1.0),  # b: input_model_parameters apply in every slice
    (UP.format(3), 0.45, 0.45),
    (LN.format(2), 0.3, 0.9),
])
def test_per_model_precedence(precedence_plan: MergePlan, llama_models: list[Path],
                              tensor: str, density_b: float, density_c: float):
    _, b, c = (str(p) for p in llama_models)
    j = job(precedence_plan, tensor)
    assert [r.model for r in j.inputs] == [b, c]  # params are aligned to the non-base inputs
    assert j.params["density"] == pytest.approx((density_b, density_c))


def test_per_model_weight_from_source_and_top_level(precedence_plan: MergePlan):
    assert job(precedence_plan, Q.format(0)).params["weight"] == pytest.approx((1.0, 0.5))
    # the second slice's sources set nothing: top-level for both
    assert job(precedence_plan, Q.format(3)).params["weight"] == pytest.approx((1.0, 1.0))


def test_method_wide_parameters_slice_beats_top_level(precedence_plan: MergePlan):
    first, second = job(precedence_plan, Q.format(1)), job(precedence_plan, Q.format(2))
    assert first.params["normalize"] is False  # slice
    assert second.params["normalize"] is True  # default
    assert first.params["lambda"] == pytest.approx(0.7)  # top-level
    assert second.params["lambda"] == pytest.approx(0.7)
    assert first.params["consensus"] == "sum"  # default


def test_models_form_precedence(llama_models: list[Path], reader: SafetensorsReader):
    a, b, c = (str(p) for p in llama_models)
    recipe = {
        "merge_method": "linear",
        "models": [{"model": a, "parameters": {"weight": [{"filter": "mlp", "value": 5.0}]}},
                   {"model": b}, {"model": c}],
        "input_model_parameters": {a: {"weight": 4.0}, b: {"weight": 3.0}},
        "parameters": {"weight": 2.0, "normalize": False},
    }
    plan = plan_for(recipe, reader)
    assert job(plan, UP.format(0)).params["weight"] == pytest.approx((5.0, 3.0, 2.0))
    assert job(plan, Q.format(0)).params["weight"] == pytest.approx((4.0, 3.0, 2.0))
    assert job(plan, EMBED).params["normalize"] is False


def test_gradient_through_the_levels(llama_models: list[Path], reader: SafetensorsReader):
    a, b, _ = (str(p) for p in llama_models)
    # a slice-level gradient for attention only; the top-level gradient for everything else
    recipe = {
        "merge_method": "slerp", "base_model": a,
        "slices": [{"sources": [{"model": a, "layer_range": [0, 4]},
                                {"model": b, "layer_range": [0, 4]}],
                    "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.6]}]}}],
        "parameters": {"t": [1.0, 0.0]},
    }
    plan = plan_for(recipe, reader)
    for i in range(4):
        assert job(plan, Q.format(i)).params["t"] == pytest.approx(0.6 * i / 3)
        assert job(plan, UP.format(i)).params["t"] == pytest.approx(1.0 - i / 3)
    assert job(plan, EMBED).params["t"] == pytest.approx(1.0)  # t = 0 outside the layers
    assert job(plan, NORM).params["t"] == pytest.approx(1.0)


# -- the methods' parameter models coerce nothing ----------------------------------------------

@pytest.mark.parametrize("method, values", [
    ("slerp", {"t": "0.5"}), ("slerp", {"t": True}), ("linear", {"weight": ("1",)}),
    ("linear", {"weight": (True,)}), ("linear", {"weight": (1.0,), "normalize": 1}),
    ("linear", {"weight": (1.0,), "normalize": "true"}),
    ("ties", {"weight": (1.0,), "consensus": 1}), ("karcher", {"max_iter": 10.0}),
])
def test_params_models_refuse_strings_booleans_and_floats_for_other_types(
        method: str, values: dict):
    with pytest.raises(ValidationError):
        get_method(method).make_params(values)


def test_params_models_take_integers_for_floats_and_lists_for_per_model_tuples():
    params = get_method("linear").make_params({"weight": [1, 2.5], "normalize": False})
    assert params.weight == (1.0, 2.5) and all(type(w) is float for w in params.weight)
    assert get_method("slerp").make_params({"t": 1}).t == 1.0
