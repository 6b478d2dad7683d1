"""The recipe: parsing, every user error named by its YAML path, and the YAML round trip.

Models are referenced by hub ids: parsing a recipe never opens a model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import write_recipe

from mergekit.config import (
    Conditional,
    MergeConfiguration,
    load_config,
    parse_config,
)
from mergekit.errors import MergeError
from mergekit.recipe_fields import FLOAT32_MAX, FLOAT32_TINY
from mergekit.refs import ModelReference

A, B, C = "org/model-a", "org/model-b", "org/model-c"


def linear_models(**extra: object) -> dict:
    return {"merge_method": "linear", "models": [{"model": A}, {"model": B}], **extra}


def linear_slices(*slices: list[dict], **extra: object) -> dict:
    return {"merge_method": "linear", "slices": [{"sources": s} for s in slices], **extra}


def src(model: str, start: int, end: int, **extra: object) -> dict:
    return {"model": model, "layer_range": [start, end], **extra}


def parse_error(recipe: object) -> str:
    with pytest.raises(MergeError) as info:
        parse_config(recipe)
    assert info.value.exit_code == 2
    return str(info.value)


# -- valid recipes, as users of the established tool write them ---------------------------

TIES_RECIPE = """\
models:
  - model: org/base-7b
    # no parameters necessary for base model
  - model: org/math-7b
    parameters:
      density: 0.5
      weight: 0.5
  - model: org/code-7b
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
merge_method: ties
base_model: org/base-7b
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
"""

SLERP_RECIPE = """\
slices:
  - sources:
      - model: org/base-7b
        layer_range: [0, 32]
      - model: org/chat-7b
        layer_range: [0, 32]
merge_method: slerp
base_model: org/base-7b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""

LINEAR_RECIPE = """\
models:
  - model: org/model-a
  - model: org/model-b
merge_method: linear
parameters:
  weight: 1.0
input_model_parameters:
  org/model-b:
    weight: 3.0
out_dtype: float16
tokenizer_source: org/model-a
chat_template: chatml
"""


def test_ties_recipe(tmp_path: Path):
    cfg = load_config(write_text(tmp_path / "ties.yml", TIES_RECIPE))
    assert cfg.merge_method == "ties"
    assert cfg.base_model == ModelReference("org/base-7b")
    assert [m.model.path for m in cfg.models] == ["org/base-7b", "org/math-7b", "org/code-7b"]
    assert cfg.models[0].parameters is None
    assert cfg.models[1].parameters["density"] == (Conditional(value=0.5),)
    assert cfg.models[2].parameters["weight"] == (Conditional(value=(0.0, 0.3, 0.7, 1.0)),)
    assert cfg.parameters["int8_mask"] == (Conditional(value=True),)
    assert cfg.parameters["normalize"] == (Conditional(value=True),)
    assert cfg.dtype == "bfloat16" and cfg.output_dtype == "bfloat16"
    assert cfg.slices is None


def test_slerp_recipe_with_filtered_gradients(tmp_path: Path):
    cfg = load_config(write_text(tmp_path / "slerp.yml", SLERP_RECIPE))
    (sl,) = cfg.slices
    assert [(s.model.path, s.layer_range) for s in sl.sources] == [
        ("org/base-7b", (0, 32)), ("org/chat-7b", (0, 32))]
    assert cfg.parameters["t"] == (
        Conditional(filter="self_attn", value=(0.0, 0.5, 0.3, 0.7, 1.0)),
        Conditional(filter="mlp", value=(1.0, 0.5, 0.7, 0.3, 0.0)),
        Conditional(filter=None, value=0.5),
    )


def test_linear_recipe_with_input_model_parameters(tmp_path: Path):
    cfg = load_config(write_text(tmp_path / "linear.yml", LINEAR_RECIPE))
    assert cfg.input_model_parameters == {"org/model-b": {"weight": (Conditional(value=3.0),)}}
    assert cfg.dtype is None and cfg.out_dtype == "float16" and cfg.output_dtype == "float16"
    assert cfg.tokenizer_source == "org/model-a"
    assert cfg.chat_template == "chatml"
    assert cfg.referenced_models() == [ModelReference(A), ModelReference(B)]


def test_out_dtype_wins_over_dtype():
    cfg = parse_config(linear_models(dtype="bfloat16", out_dtype="float32"))
    assert cfg.output_dtype == "float32"


def test_revision_in_a_reference():
    cfg = parse_config({"merge_method": "linear", "models": [{"model": "org/x@v1.0"}]})
    assert cfg.models[0].model == ModelReference("org/x", "v1.0")


def test_referenced_models_in_first_seen_order():
    cfg = parse_config({
        "merge_method": "ties", "base_model": B,
        "slices": [{"sources": [src(A, 0, 2), src(B, 0, 2)]},
                   {"sources": [src(C, 2, 4), src(B, 2, 4)]}],
        "parameters": {"weight": 1.0}})
    assert [str(r) for r in cfg.referenced_models()] == [B, A, C]


def test_literal_jinja_chat_template_is_accepted():
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert parse_config(linear_models(chat_template=template)).chat_template == template


@pytest.mark.parametrize("text", [TIES_RECIPE, SLERP_RECIPE, LINEAR_RECIPE],
                         ids=["ties", "slerp", "linear"])
def test_to_yaml_round_trips(tmp_path: Path, text: str):
    original = load_config(write_text(tmp_path / "r.yml", text))
    again = load_config(write_text(tmp_path / "again.yml", original.to_yaml()))
    assert again == original


def test_to_yaml_round_trips_slices_with_per_source_filters(tmp_path: Path):
    recipe = {
        "merge_method": "ties", "base_model": A,
        "slices": [
            {"sources": [src(A, 0, 2), src(B, 0, 2, parameters={
                "weight": [{"filter": "mlp", "value": [0.1, 0.9]}],
                "density": {"filter": "self_attn", "value": 0.3}})],
             "parameters": {"lambda": 0.8}},
            {"sources": [src(A, 2, 4), src(C, 1, 3)], "base_model": A},
        ],
        "parameters": {"weight": [{"filter": "embed", "value": 2}, {"value": 1}],
                       "consensus": "count"},
        "dtype": "float16",
    }
    original = parse_config(recipe)
    dumped = original.to_yaml()
    assert isinstance(yaml.safe_load(dumped), dict)
    assert parse_config(yaml.safe_load(dumped)) == original
    assert load_config(write_text(tmp_path / "r.yml", dumped)) == original


# -- models / slices -------------------------------------------------------------------------

def test_models_and_slices_together_is_an_error():
    msg = parse_error({**linear_slices([src(A, 0, 2)]), "models": [{"model": A}]})
    assert "models" in msg and "slices" in msg


def test_neither_models_nor_slices_is_an_error():
    msg = parse_error({"merge_method": "linear"})
    assert "models" in msg and "slices" in msg


def test_empty_models_list():
    assert "models" in parse_error({"merge_method": "linear", "models": []})


def test_recipe_that_is_not_a_mapping():
    assert "mapping" in parse_error(["merge_method", "linear"])


# -- unknown keys are reported with their YAML path --------------------------------------------

def test_unknown_top_level_key():
    msg = parse_error(linear_models(merge_methd="ties"))
    assert msg.startswith("recipe: merge_methd: unknown key")


def test_unknown_key_in_a_slice():
    recipe = linear_slices([src(A, 0, 2)], [src(A, 2, 4)])
    recipe["slices"][1]["weight"] = 1
    msg = parse_error(recipe)
    assert "slices[1].weight: unknown key" in msg


def test_unknown_key_in_a_source():
    msg = parse_error(linear_slices([src(A, 0, 2)], [src(A, 2, 4, foo=1)]))
    assert "slices[1].sources[0].foo: unknown key" in msg


def test_unknown_key_in_a_model_entry():
    recipe = linear_models()
    recipe["models"][1]["paramters"] = {"weight": 1}
    assert "models[1].paramters: unknown key" in parse_error(recipe)


def test_unknown_key_in_a_filter_entry():
    recipe = linear_models(parameters={"weight": [{"filter": "mlp", "valu": 1}]})
    msg = parse_error(recipe)
    assert "parameters.weight" in msg and "valu" in msg


# -- methods and their parameters ------------------------------------------------------------

def test_unknown_method_suggests_the_close_one():
    msg = parse_error({"merge_method": "tie", "models": [{"model": A}]})
    assert msg.startswith("recipe: merge_method: unknown method 'tie'")
    assert "did you mean 'ties'?" in msg
    assert "linear" in msg and "slerp" in msg  # the known methods are listed


def test_unknown_parameter_top_level():
    msg = parse_error(linear_models(parameters={"wieght": 1.0}))
    assert "parameters.wieght:" in msg and "did you mean 'weight'?" in msg


def test_unknown_parameter_of_a_model():
    recipe = {"merge_method": "ties", "base_model": A,
              "models": [{"model": A}, {"model": B, "parameters": {"weight": 1, "densty": 0.5}}]}
    msg = parse_error(recipe)
    assert "models[1].parameters.densty:" in msg and "'density'" in msg


def test_unknown_parameter_of_a_source():
    recipe = linear_slices([src(A, 0, 2), src(B, 0, 2, parameters={"tt": 0.5})])
    msg = parse_error(recipe)
    assert "slices[0].sources[1].parameters.tt:" in msg and "'linear'" in msg


def test_unknown_parameter_of_a_slice():
    recipe = linear_slices([src(A, 0, 2)])
    recipe["slices"][0]["parameters"] = {"lambdda": 1.0}
    assert "slices[0].parameters.lambdda:" in parse_error(recipe)


def test_unknown_parameter_in_input_model_parameters():
    msg = parse_error(linear_models(input_model_parameters={B: {"densiti": 0.5}}))
    assert f"input_model_parameters.{B}.densiti:" in msg


def test_input_model_parameters_for_a_model_not_in_the_recipe():
    msg = parse_error(linear_models(input_model_parameters={C: {"weight": 2.0}}))
    assert msg.startswith(f"recipe: input_model_parameters.{C}:")
    assert "not a model of this recipe" in msg


def test_input_model_parameters_may_name_the_base_model():
    recipe = {"merge_method": "ties", "base_model": C, "models": [{"model": A}],
              "parameters": {"weight": 1.0}, "input_model_parameters": {C: {"density": 0.5}}}
    assert C in parse_config(recipe).input_model_parameters


def test_merge_method_missing():
    msg = parse_error({"models": [{"model": A}]})
    assert msg == "recipe: merge_method: required field is missing"


@pytest.mark.parametrize("method", ["ties", "slerp"])
def test_base_model_missing(method: str):
    msg = parse_error({"merge_method": method, "models": [{"model": A}, {"model": B}],
                       "parameters": {"t": 0.5} if method == "slerp" else {"weight": 1.0}})
    assert msg.startswith("recipe: base_model:") and "needs a base_model" in msg


def test_base_model_missing_in_slices_names_the_slice():
    recipe = {"merge_method": "ties", "slices": [{"sources": [src(A, 0, 2), src(B, 0, 2)]}]}
    assert "slices[0].base_model:" in parse_error(recipe)


def test_slerp_with_two_non_base_models():
    recipe = {"merge_method": "slerp", "base_model": A, "parameters": {"t": 0.5},
              "models": [{"model": A}, {"model": B}, {"model": C}]}
    msg = parse_error(recipe)
    assert msg.startswith("recipe: models:") and "at most 1" in msg and "got 2" in msg


def test_slerp_with_one_other_model_is_valid():
    recipe = {"merge_method": "slerp", "base_model": A, "parameters": {"t": 0.5},
              "models": [{"model": A}, {"model": B}]}
    assert parse_config(recipe).merge_method == "slerp"


def test_slice_base_model_must_be_among_its_sources():
    recipe = {"merge_method": "ties", "base_model": C, "parameters": {"weight": 1.0},
              "slices": [{"sources": [src(A, 0, 2), src(B, 0, 2)]}]}
    assert "slices[0].sources:" in parse_error(recipe)


# -- layer ranges ----------------------------------------------------------------------------

@pytest.mark.parametrize("layer_range", [[4, 4], [-1, 2], [3, 1]])
def test_bad_layer_range(layer_range: list[int]):
    recipe = linear_slices([src(A, 0, 2)], [{"model": A, "layer_range": layer_range}],
                           [src(A, 2, 4)])
    msg = parse_error(recipe)
    assert msg.startswith("recipe: slices[1].sources[0].layer_range:")
    assert str(layer_range) in msg


def test_layer_range_missing():
    msg = parse_error(linear_slices([{"model": A}]))
    assert "slices[0].sources[0].layer_range: required field is missing" in msg


def test_sources_of_different_lengths_in_a_slice():
    recipe = linear_slices([src(A, 0, 2), src(B, 0, 2)], [src(A, 2, 4), src(B, 1, 4)])
    msg = parse_error(recipe)
    assert msg.startswith("recipe: slices[1].sources:")
    assert "[2, 4]" in msg and "[1, 4]" in msg


# -- YAML files ----------------------------------------------------------------------------------

def test_malformed_yaml_names_file_line_and_column(tmp_path: Path):
    path = write_text(tmp_path / "bad.yml",
                      "merge_method: linear\nmodels:\n  - model: org/a\n   parameters:\n")
    with pytest.raises(MergeError) as info:
        load_config(path)
    assert info.value.exit_code == 2
    # the stray indentation is on line 4, column 4
    assert str(info.value).startswith(f"{path}:4:4: malformed YAML")


def test_tab_in_yaml(tmp_path: Path):
    path = write_text(tmp_path / "tab.yml", "merge_method: linear\nmodels:\n\t- model: org/a\n")
    with pytest.raises(MergeError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:3:1: malformed YAML")


def test_missing_recipe_file(tmp_path: Path):
    with pytest.raises(MergeError) as info:
        load_config(tmp_path / "nope.yml")
    assert info.value.exit_code == 2
    assert str(tmp_path / "nope.yml") in str(info.value)


def test_empty_recipe_file(tmp_path: Path):
    with pytest.raises(MergeError) as info:
        load_config(write_text(tmp_path / "empty.yml", ""))
    assert "mapping" in str(info.value)


def test_errors_from_a_file_name_the_file(tmp_path: Path):
    path = write_recipe(tmp_path / "r.yml", linear_slices([src(A, 0, 2)], [src(A, 2, 4, x=1)]))
    with pytest.raises(MergeError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: slices[1].sources[0].x: unknown key")


# -- features not supported yet, closed sets ----------------------------------------------------

def test_tokenizer_source_union_and_the_tokenizer_block():
    assert parse_config(linear_models(tokenizer_source="union")).vocabulary_source == "union"
    cfg = parse_config(linear_models(tokenizer={"pad_to_multiple_of": 8}))
    assert cfg.vocabulary_source == "union" and cfg.tokenizer.pad_to_multiple_of == 8


@pytest.mark.parametrize(("extra", "where", "what"), [
    ({"tokenizer_source": "union", "tokenizer": {"source": "union"}}, "tokenizer_source:",
     "not both"),
    ({"tokenizer": {"pad_to_multiple_of": 0}}, "tokenizer.pad_to_multiple_of:",
     "positive"),
    ({"tokenizer": {"source": "base"}}, "tokenizer.source:", "needs a base_model"),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "zeros"}}}}},
     "tokenizer.tokens.<x>.source.kind:", "neither model_token nor zero"),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token",
                                                   "model": "org/model-a"}}}}},
     "tokenizer.tokens.<x>.source:", "exactly one of token or token_id"),
    ({"tokenizer": {"tokens": {"<x>": {"source": "org/other"}}}},
     "tokenizer.tokens.<x>.source:", "not a model of the recipe"),
    ({"tokenizer": {"tokens": {"<x>": {"source": 3}}}}, "tokenizer.tokens.<x>.source:",
     "give a model"),
])
def test_tokenizer_block_errors(extra, where, what):
    msg = parse_error(linear_models(**extra))
    assert where in msg and what in msg, msg


def test_tokenizer_source_base_needs_a_base_model():
    assert "tokenizer_source:" in parse_error(linear_models(tokenizer_source="base"))


def test_lora_references_in_models_and_sources():
    cfg = parse_config({"merge_method": "linear", "models": [{"model": A},
                                                             {"model": f"{B}+org/lora"}]})
    assert str(cfg.models[1].model) == f"{B}+org/lora"
    cfg = parse_config(linear_slices([src(f"{A}+org/lora@v1", 0, 2)]))
    assert cfg.slices[0].sources[0].model.lora.revision == "v1"


def test_a_bad_lora_reference_names_its_field():
    msg = parse_error(linear_slices([src(f"{A}+not a ref!", 0, 2)]))
    assert msg.startswith("recipe: slices[0].sources[0].model:") and "not a ref!" in msg


def test_unknown_chat_template():
    msg = parse_error(linear_models(chat_template="chatmll"))
    assert msg.startswith("recipe: chat_template:") and "'chatmll'" in msg
    assert "chatml" in msg.split("'chatmll'")[1]  # the known names are listed


@pytest.mark.parametrize("field", ["dtype", "out_dtype"])
@pytest.mark.parametrize("value", ["float64", "int8", "fp16"])
def test_dtype_outside_the_closed_set(field: str, value: str):
    msg = parse_error(linear_models(**{field: value}))
    assert msg.startswith(f"recipe: {field}:") and "bfloat16" in msg


def test_gradient_must_hold_numbers():
    msg = parse_error(linear_models(parameters={"weight": [1.0, "x"]}))
    assert "parameters.weight" in msg


def test_bad_reference():
    msg = parse_error({"merge_method": "linear", "models": [{"model": "not a model!"}]})
    assert "models[0].model:" in msg


def test_configuration_is_frozen():
    cfg = parse_config(linear_models())
    assert isinstance(cfg, MergeConfiguration)
    with pytest.raises(Exception):  # noqa: B017  (pydantic's frozen-instance error)
        cfg.merge_method = "ties"  # type: ignore[misc]


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_empty_layer_range_allowed_in_first_and_last_slice():
    recipe = linear_slices([src(A, 0, 0)], [src(B, 0, 2)], [src(C, 3, 3)],
                           parameters={"weight": 1.0})
    cfg = parse_config(recipe)
    assert [s.sources[0].layer_range for s in cfg.slices] == [(0, 0), (0, 2), (3, 3)]


def test_only_empty_slices_is_an_error():
    msg = parse_error(linear_slices([src(A, 0, 0)], parameters={"weight": 1.0}))
    assert msg.startswith("recipe: slices: no slice takes any layer")


# -- numbers the float32 math cannot hold ------------------------------------------------------

def test_float32_bounds_are_float32s_own():
    info = np.finfo(np.float32)
    assert FLOAT32_MAX == float(info.max) and FLOAT32_TINY == float(info.tiny)


def test_weight_past_float32_is_refused_where_it_is_set(tmp_path: Path):
    with np.errstate(over="ignore"):
        assert np.isinf(np.float32(1e39))  # every output value would be NaN or inf
    path = write_text(tmp_path / "r.yml", "merge_method: linear\nmodels:\n  - model: org/a\n"
                      "    parameters: {weight: 1}\n  - model: org/b\n"
                      "    parameters: {weight: 1e39}\n")
    with pytest.raises(MergeError) as info:
        load_config(path)
    assert info.value.exit_code == 2
    assert str(info.value) == (f"{path}: models[1].parameters.weight: 1e+39 does not fit in "
                               "float32 (largest magnitude 3.403e+38); give a smaller number")


@pytest.mark.parametrize("value, shown", [
    (1e39, "1e+39 does not fit"), (-1e39, "-1e+39 does not fit"),
    (10**39, "1e+39 does not fit"), ([0.5, 3.5e38], "3.5e+38 does not fit"),
    ([0.5, 10**400], "100000000000000000...0000000000000000000 does not fit"),  # past float64
    ([{"filter": "mlp", "value": [1, -1e39]}, {"value": 1}], "-1e+39 does not fit"),
    (1e-39, "1e-39 is too small for float32"), ([1, -1e-300], "-1e-300 is too small"),
])
def test_values_past_float32_are_refused(value: object, shown: str):
    recipe = linear_models(input_model_parameters={A: {"weight": value}})
    assert parse_error(recipe).startswith(f"recipe: input_model_parameters.{A}.weight: {shown}")


@pytest.mark.parametrize("value", [FLOAT32_MAX, -FLOAT32_MAX, FLOAT32_TINY, -FLOAT32_TINY, 0,
                                   0.0, [0, FLOAT32_MAX]])
def test_values_float32_holds_are_kept(value: object):
    cfg = parse_config(linear_models(parameters={"weight": value}))
    setting = cfg.parameters["weight"][0].value
    assert setting == (tuple(value) if isinstance(value, list) else value)
    with np.errstate(over="raise", under="raise"):
        np.float32(setting)


# -- no coercion: a quoted number, a boolean or 2.0 where the type is another ---------------

SLERP = {"merge_method": "slerp", "base_model": A, "models": [{"model": A}, {"model": B}]}
TIES = {"merge_method": "ties", "base_model": A, "models": [
    {"model": A}, {"model": B, "parameters": {"weight": 1, "density": 0.5}}]}
KARCHER = {"merge_method": "karcher", "models": [{"model": A}, {"model": B}]}


@pytest.mark.parametrize("recipe, params, message", [
    (SLERP, {"t": "0.5"}, "parameters.t: '0.5' is a string; give a number, without quotes"),
    (SLERP, {"t": True}, "parameters.t: true is a boolean; give a number"),
    (SLERP, {"t": "half"}, "parameters.t: 'half' is a string; give a number"),
    (SLERP, {"t": [{"filter": "mlp", "value": "1"}, {"value": 0.5}]},
     "parameters.t: '1' is a string; give a number, without quotes"),
    (TIES, {"normalize": 1}, "parameters.normalize: 1 is a number; give true or false"),
    (TIES, {"normalize": "true"},
     "parameters.normalize: 'true' is a string; give true or false, without quotes"),
    (TIES, {"consensus": "median"},
     "parameters.consensus: 'median' is not a choice; give one of: sum, count"),
    (TIES, {"normalize": [0, 1]},
     "parameters.normalize: a gradient (list of numbers) does not fit here; give true or "
     "false"),
    (KARCHER, {"max_iter": 10.0},
     "parameters.max_iter: 10.0 is not written as a whole number; drop the decimal point"),
    (KARCHER, {"max_iter": 1e9},
     "parameters.max_iter: 1000000000.0 is not written as a whole number; drop the decimal "
     "point"),
    (KARCHER, {"max_iter": "10"},
     "parameters.max_iter: '10' is a string; give a whole number, without quotes"),
    (KARCHER, {"max_iter": False}, "parameters.max_iter: false is a boolean; give a whole number"),
])
def test_parameter_values_are_not_coerced(recipe: dict, params: dict, message: str):
    assert parse_error({**recipe, "parameters": params}) == f"recipe: {message}"


def test_per_model_strings_are_refused_where_set():
    recipe = {**TIES, "models": [{"model": A}, {"model": B, "parameters": {"weight": "1"}}]}
    assert parse_error(recipe) == ("recipe: models[1].parameters.weight: '1' is a string; "
                                   "give a number, without quotes")


def test_integers_are_numbers():
    cfg = parse_config({**SLERP, "parameters": {"t": 1}})
    assert cfg.parameters["t"][0].value == 1


@pytest.mark.parametrize("layer_range", [[False, True], ["0", "2"], [0, 2.0]])
def test_layer_range_is_two_integers_not_coerced(layer_range: list):
    message = parse_error(linear_slices([src(A, 0, 2), {"model": B,
                                                        "layer_range": layer_range}]))
    assert "slices[0].sources[1].layer_range[" in message
    assert "Input should be a valid integer" in message


def test_recipe_errors_are_value_and_runtime_errors():
    """Scripts written for mergekit 0.1.x catch its validators' ValueError and its reference
    parser's RuntimeError; both must catch ours, and the exit code stays a usage error's."""
    for catch in (ValueError, RuntimeError):
        with pytest.raises(catch) as info:
            parse_config(linear_models(parameters={"wieght": 1.0}))
        assert isinstance(info.value, MergeError) and info.value.exit_code == 2
