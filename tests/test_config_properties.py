"""Property-based tests of the recipe parser: random, valid and mutated recipes.

Every outcome of ``parse_config`` is a MergeConfiguration or a clean recipe error (a
one-line MergeError with exit code 2 that names the YAML path); never a traceback. A parsed
recipe survives the YAML round trip, and ``build_plan`` on it gives a plan or a MergeError.
"""

from __future__ import annotations

import copy
import math
import os
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mergekit.config import (
    MergeConfiguration,
    dump_yaml,
    load_config,
    parse_config,
    recipe_to_plain,
)
from mergekit.errors import MergeError
from mergekit.io.model import ModelSource, open_model
from mergekit.io.safetensors_file import SafetensorsReader
from mergekit.methods.registry import Method, all_methods
from mergekit.plan import MergePlan, build_plan
from mergekit.recipe_fields import FLOAT32_TINY
from mergekit.recipe_yaml import MAX_ALIAS_VALUES
from mergekit.refs import parse_model_reference

METHODS = all_methods()
MODELS = ("<a>", "<b>", "<c>")  # placeholders, bound to the llama_models folders
LAYERS = 4  # layers of each llama_models fixture
SCHEMA_KEYS = (
    "merge_method", "models", "slices", "base_model", "parameters", "input_model_parameters",
    "dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template", "model",
    "layer_range", "sources", "filter", "value", "weight", "density", "t",
)

# Deterministic (CI) and fast. MERGEKIT_FUZZ=N runs N times as many examples from a random
# seed: a longer hunt on a developer's machine.
_FUZZ = int(os.environ.get("MERGEKIT_FUZZ", "0") or 0)


def examples(n: int) -> settings:
    return settings(derandomize=not _FUZZ, deadline=None, max_examples=n * max(_FUZZ, 1),
                    database=None, suppress_health_check=[
                        HealthCheck.too_slow, HealthCheck.data_too_large,
                        HealthCheck.function_scoped_fixture])


# -- strategies ------------------------------------------------------------------------------

# what yaml.safe_load can produce: also dates, bytes (!!binary) and sets (!!set)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.dates(),
    st.datetimes(), st.binary(max_size=6), st.frozensets(st.text(max_size=3), max_size=3),
    st.sampled_from(["", " ", "\n", "linear", "ties", "float16", "base", "auto", "<a>", "a@"]),
)
keys = st.one_of(st.sampled_from(SCHEMA_KEYS), st.text(max_size=8), st.integers(-2, 2),
                 st.none(), st.booleans())
yaml_like = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(keys, inner, max_size=4)),
    max_leaves=25,
)


def _literal_choices(method: Method, name: str) -> tuple[str, ...]:
    spec = method.param(name)
    annotation = method.params_model.model_fields[spec.attr].annotation
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()


def _number_range(method: Method, name: str) -> tuple[float, float]:
    """A range of values the method accepts for this parameter (gradients stay inside)."""
    if name == "density":
        return (0.3, 0.7) if method.name.startswith("della") else (0.0, 1.0)
    if name == "epsilon" and method.name.startswith("della"):
        return 0.0, 0.25
    if name in ("gamma", "t", "select_topk", "r", "alpha"):
        return 0.05, 0.95
    if name in ("eps", "tol", "epsilon"):
        return 1e-8, 1e-2
    return 0.1, 2.0  # weights, lambda, scale


@st.composite
def number_setting(draw: st.DrawFn, low: float, high: float) -> Any:
    """A scalar, a gradient, or a list of {filter, value} entries ending in a catch-all."""
    # no magnitudes below float32's smallest normal number: the recipe refuses them
    number = st.floats(low, high, allow_nan=False).map(
        lambda v: 0.0 if abs(v) < FLOAT32_TINY else v)
    gradient = st.lists(number, min_size=1, max_size=5)
    kind = draw(st.sampled_from(["scalar", "gradient", "filters"]))
    if kind == "scalar":
        return draw(number)
    if kind == "gradient":
        return draw(gradient)
    value = number | gradient
    entries = [{"filter": draw(st.sampled_from(["mlp", "self_attn", "norm", "embed", "nothing"])),
                "value": draw(value)} for _ in range(draw(st.integers(0, 2)))]
    return [*entries, {"value": draw(value)}]


def global_setting(method: Method, name: str) -> st.SearchStrategy[Any]:
    spec = method.param(name)
    if spec.kind == "bool":
        return st.booleans()
    if spec.kind == "int":
        return st.integers(1, 5)
    if _literal_choices(method, name):
        return st.sampled_from(_literal_choices(method, name))
    return number_setting(*_number_range(method, name))


@st.composite
def valid_recipes(draw: st.DrawFn, method_name: str | None = None) -> dict[str, Any]:
    """A recipe of the real schema that parses and plans, over the MODELS placeholders."""
    method = METHODS[method_name or draw(st.sampled_from(sorted(METHODS)))]
    order = draw(st.permutations(MODELS))
    use_base = method.base == "required" or draw(st.booleans())
    base = order[0] if use_base else None
    others = [m for m in order if m != base]
    most = min(method.max_models or len(others), len(others))
    n = draw(st.integers(method.min_models, most))
    inputs = others[:n]
    recipe: dict[str, Any] = {"merge_method": method.name}

    globals_ = [p for p in method.params if not p.per_model]
    per_model = [p for p in method.params if p.per_model]
    top: dict[str, Any] = {}
    for spec in globals_:
        if spec.required or draw(st.booleans()):
            top[spec.name] = draw(global_setting(method, spec.name))
    for spec in per_model:  # a catch-all at the top level covers every tensor
        if spec.required or draw(st.booleans()):
            top[spec.name] = draw(number_setting(*_number_range(method, spec.name)))

    def model_params() -> dict[str, Any] | None:
        chosen = draw(st.lists(st.sampled_from(per_model), unique=True)) if per_model else []
        if not chosen:
            return None
        return {p.name: draw(number_setting(*_number_range(method, p.name))) for p in chosen}

    listed = ([base] if base and method.base != "unused" else []) + inputs
    if draw(st.booleans()):
        models = []
        for m in draw(st.permutations(listed)):
            entry: dict[str, Any] = {"model": m}
            params = model_params()
            if params:
                entry["parameters"] = params
            models.append(entry)
        recipe["models"] = models
    else:
        recipe["slices"] = draw(slices(listed, model_params))
    if base:
        recipe["base_model"] = base
    if top:
        recipe["parameters"] = top
    if draw(st.booleans()):
        imp = {m: p for m in listed if (p := model_params())}
        if imp:
            recipe["input_model_parameters"] = imp
    for key in ("dtype", "out_dtype"):
        if draw(st.booleans()):
            recipe[key] = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    tokenizer = draw(st.sampled_from([None, *listed] + (["base"] if base else [])))
    if tokenizer:
        recipe["tokenizer_source"] = tokenizer
    template = draw(st.sampled_from([None, "auto", "chatml", "llama3", "{{ messages }}"]))
    if template:
        recipe["chat_template"] = template
    return recipe


@st.composite
def slices(draw: st.DrawFn, listed: list[str], model_params: Any) -> list[dict[str, Any]]:
    """1-3 output slices; empty ranges only first or last; every slice takes all models."""
    count = draw(st.integers(1, 3))
    lengths = [draw(st.integers(0 if i in (0, count - 1) else 1, LAYERS)) for i in range(count)]
    if not any(lengths):
        lengths[-1] = 1
    out = []
    for length in lengths:
        sources = []
        for m in draw(st.permutations(listed)):
            start = draw(st.integers(0, LAYERS - length))
            src: dict[str, Any] = {"model": m, "layer_range": [start, start + length]}
            params = model_params()
            if params:
                src["parameters"] = params
            sources.append(src)
        out.append({"sources": sources})
    return out


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _paths(v, (*prefix, i))


def _get(data: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        data = data[part]
    return data


BAD_VALUES = st.one_of(
    yaml_like,
    st.sampled_from([[0, 99], [-1, 2], [3, 1], [0], [0, 1, 2], ["a", 1], [0.5, 2], [],
                     -0.5, 1.5, 1e300, -1e300, float("nan"), float("inf"), 2**70, "",
                     {"filter": "mlp"}, [{"value": 1}, 3], "org/missing-model", "/no/such/dir",
                     "<a>@main", "<a>+lora", "union", "tie", {}]),
).map(copy.deepcopy)  # mutations change values in place: never share a sampled one

PARAM_NAMES = sorted({p.name for m in METHODS.values() for p in m.params} | {"bogus"})
PARAM_VALUES = st.sampled_from([
    -0.5, 0, 0.0, 0.5, 1, 1.5, [0.2, 0.8], [1, 0, 1], 1e300, -1e300, 2**70, True, "0.5", "x",
    [], [0.5] * 40, [-1, 2],
    [{"filter": "mlp", "value": 0.5}],  # no catch-all: other tensors fall through
    [{"filter": "embed", "value": [0.1, 0.9]}, {"value": 2}], {"value": -3},
]).map(copy.deepcopy)
LAYER_RANGES = st.sampled_from([[0, 99], [-1, 2], [3, 1], [4, 4], [2, 2], [0, 5], [5, 9],
                                [0, 1], [1, 4], [0, 4]]).map(list)
TOP_LEVEL_VALUES = {
    "dtype": ["float64", "int8", "float16", "", None],
    "out_dtype": ["bf16", "bfloat16"],
    "tokenizer_source": ["base", "union", "<c>", "org/missing", "", "<a>@main"],
    "chat_template": ["nope", "chatml", "{{ messages }}", "", "auto"],
    "tokenizer": [{"source": "union"}],
    "base_model": ["<a>", "<b>", "<c>", "org/missing", "<a>+lora", ""],
    "merge_method": sorted(METHODS) + ["tie", "LINEAR", ""],
}


def _structural(draw: st.DrawFn, recipe: dict[str, Any]) -> tuple[Any, str]:
    """Delete, rename, insert, retype, empty, duplicate or re-nest one node."""
    paths = list(_paths(recipe))[1:]
    if not paths:  # everything was deleted
        recipe[draw(keys)] = draw(BAD_VALUES)
        return recipe, "insert at []"
    path = draw(st.sampled_from(paths))
    target = _get(recipe, path)
    parent = _get(recipe, path[:-1])
    ops = ["delete", "replace", "wrap_list", "wrap_dict"]
    if isinstance(target, dict):
        ops += ["insert", "rename"] if target else ["insert"]
    if isinstance(target, list) and target:
        ops += ["empty", "duplicate"]
    op = draw(st.sampled_from(ops))
    if op == "delete":
        del parent[path[-1]]
    elif op == "insert":
        target[draw(keys)] = draw(BAD_VALUES)
    elif op == "rename":
        target[draw(keys)] = target.pop(draw(st.sampled_from(list(target))))
    elif op == "empty":
        target.clear()
    elif op == "duplicate":
        target.append(copy.deepcopy(draw(st.sampled_from(target))))
    else:
        parent[path[-1]] = {"replace": lambda: draw(BAD_VALUES), "wrap_list": lambda: [target],
                            "wrap_dict": lambda: {draw(keys): target}}[op]()
    return recipe, f"{op} at {list(path)}"


def _param_name(draw: st.DrawFn, recipe: dict[str, Any]) -> str:
    """Mostly a parameter of the recipe's method; sometimes any method's (or none's)."""
    method = recipe.get("merge_method")
    method = METHODS.get(method) if isinstance(method, str) else None
    own = [p.name for p in method.params] if method and method.params else PARAM_NAMES
    return draw(st.sampled_from(own if draw(st.integers(0, 3)) else PARAM_NAMES))


def _semantic(draw: st.DrawFn, recipe: dict[str, Any]) -> tuple[Any, str]:
    """A well-formed but doubtful value: out-of-range layers, odd parameters, another
    method, a model not in the recipe, ..."""
    paths = list(_paths(recipe))
    ranges = [p for p in paths if p and p[-1] == "layer_range"]
    ops = ["parameter", "top_level", "input_model_parameters"] + (["layers"] if ranges else [])
    op = draw(st.sampled_from(ops))
    if op == "layers":
        path = draw(st.sampled_from(ranges))
        value = draw(LAYER_RANGES)
        targets = [path]
        if draw(st.booleans()):  # the whole slice: its sources keep one length
            targets = [p for p in ranges if p[:-3] == path[:-3]]
        for p in targets:
            _get(recipe, p[:-1])[p[-1]] = list(value)
        return recipe, f"layer_range {value} at {[list(p) for p in targets]}"
    if op == "parameter":
        holders = [p for p in paths if p and p[-1] == "parameters"
                   and isinstance(_get(recipe, p), dict)]
        if not holders:
            recipe["parameters"] = {}
            holders = [("parameters",)]
        path = draw(st.sampled_from(holders))
        params = _get(recipe, path)
        name, value = _param_name(draw, recipe), draw(PARAM_VALUES)
        params[name] = value
        return recipe, f"{name}={value!r} at {list(path)}"
    if op == "input_model_parameters":
        key = draw(st.sampled_from([*MODELS, "org/missing", "<a>@main"]))
        if not isinstance(recipe.get("input_model_parameters"), dict):
            recipe["input_model_parameters"] = {}
        recipe["input_model_parameters"][key] = {_param_name(draw, recipe): draw(PARAM_VALUES)}
        return recipe, f"input_model_parameters[{key}]"
    key = draw(st.sampled_from(sorted(TOP_LEVEL_VALUES)))
    value = copy.deepcopy(draw(st.sampled_from(TOP_LEVEL_VALUES[key])))
    recipe[key] = value
    return recipe, f"{key}={value!r}"


@st.composite
def mutated_recipes(draw: st.DrawFn, structural: bool = True) -> tuple[Any, list[str]]:
    """A valid recipe after 1-3 mutations; returns (recipe, descriptions of the mutations).
    Without ``structural``, only well-formed but doubtful values (most reach the planner)."""
    recipe: Any = draw(valid_recipes())
    done = []
    for _ in range(draw(st.integers(1, 3))):
        mutate = _structural if structural and draw(st.booleans()) else _semantic
        recipe, what = mutate(draw, recipe)
        done.append(what)
    return recipe, done


# -- the properties ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(llama_models: list[Path]) -> Iterator[dict[str, ModelSource]]:
    reader = SafetensorsReader()
    yield {str(p): open_model(parse_model_reference(str(p)), reader, None)
           for p in llama_models}
    reader.close()


def bind(data: Any, folders: list[Path]) -> Any:
    """Replace the <a>/<b>/<c> placeholders (in values and keys) by the model folders."""
    names = dict(zip(MODELS, (str(f) for f in folders), strict=True))

    def sub(v: Any) -> Any:
        if isinstance(v, str):
            for k, folder in names.items():
                v = v.replace(k, folder)
            return v
        if isinstance(v, dict):
            return {sub(k): sub(x) for k, x in v.items()}
        if isinstance(v, list):
            return [sub(x) for x in v]
        return v

    return sub(data)


FIELDS = ("merge_method", "models", "slices", "base_model", "parameters",
          "input_model_parameters", "dtype", "out_dtype", "tokenizer_source", "tokenizer",
          "chat_template", "model", "layer_range", "sources", "filter", "value")
LOCATION_FREE = ("the recipe must be a YAML mapping", "give exactly one of 'models' or 'slices'")


def _simple_key(key: Any) -> bool:
    return (isinstance(key, str) and key != "" and key.isprintable() and key.strip() == key
            and ": " not in key and "; " not in key and len(key) <= 200)


def known_locations(data: Any) -> set[str] | None:
    """Every YAML path of the data, written as errors write them (``a.b[0].c``), plus the
    fields and items a mapping or list may be missing; None where a key is too odd to
    predict how it is written."""
    out: set[str] = set()
    for path in _paths(data):
        text, node = "", data
        for part in path:
            if isinstance(node, list):
                text += f"[{part}]"
            elif _simple_key(part):
                text += f".{part}" if text else part
            else:
                return None
            node = node[part]
        if path:
            out.add(text)
        if isinstance(node, dict):
            out.update(f"{text}.{f}" if text else f for f in FIELDS)
        if isinstance(node, list):
            out.update(f"{text}[{i}]" for i in range(len(node) + 2))
    return out


def check_clean_error(exc: MergeError, data: Any = None) -> None:
    """One non-empty line, exit code 2; with ``data``: the first problem is either a
    whole-recipe one or starts with the YAML path of a node of the recipe (or of a field
    the node lacks)."""
    message = str(exc)
    assert exc.exit_code == 2, message
    assert message.strip() and "\n" not in message and "\r" not in message, repr(message)
    assert "Traceback" not in message and "pydantic" not in message.lower(), message
    if data is None or not isinstance(data, dict):
        return
    rest = message.removeprefix("recipe: ")
    if rest.startswith(LOCATION_FREE):
        return
    where = rest.split(": ", 1)[0]
    known = known_locations(data)
    if known is not None:
        assert where in known, f"{where!r} is not a path of the recipe: {message}"


def parse_outcome(data: Any) -> MergeConfiguration | None:
    """parse_config's result, or None after checking that the error is a clean one."""
    try:
        config = parse_config(data)
    except MergeError as exc:
        check_clean_error(exc, data)
        return None
    assert isinstance(config, MergeConfiguration)
    return config


def same_plain(a: Any, b: Any) -> bool:
    """Equality of plain recipe data where NaN equals NaN."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_plain(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_plain(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def check_round_trip(config: MergeConfiguration) -> None:
    text = config.to_yaml()
    again = parse_config(yaml.safe_load(text))
    assert same_plain(recipe_to_plain(again), recipe_to_plain(config)), text
    assert again == config, text


def plan_for(config: MergeConfiguration, sources: dict[str, ModelSource]) -> MergePlan | None:
    """build_plan over the fixture models; None where the recipe names a hub model (planning
    would download it)."""
    refs = [str(r) for r in config.referenced_models()]
    if not all(r in sources for r in refs):
        return None
    return build_plan(config, {r: sources[r] for r in refs})


def expected_layers(recipe: dict[str, Any]) -> int:
    if "models" in recipe:
        return LAYERS
    return sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0]
               for s in recipe["slices"])


@pytest.mark.slow
@examples(300)
@given(data=yaml_like)
def test_arbitrary_data_parses_or_fails_cleanly(data: Any):
    parse_outcome(data)


@pytest.mark.slow
@examples(300)
@given(data=st.dictionaries(st.sampled_from(SCHEMA_KEYS), yaml_like, max_size=6))
def test_schema_keyed_data_parses_or_fails_cleanly(data: Any):
    parse_outcome(data)


@pytest.mark.slow
@examples(300)
@given(recipe=valid_recipes())
def test_valid_recipes_parse_round_trip_and_plan(recipe: dict, llama_models, sources):
    check_valid(recipe, llama_models, sources)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_has_valid_recipes(method: str, llama_models, sources):
    @examples(10)
    @given(recipe=valid_recipes(method))
    def check(recipe: dict) -> None:
        check_valid(recipe, llama_models, sources)

    check()


def check_valid(recipe: dict[str, Any], llama_models: list[Path],
                sources: dict[str, ModelSource]) -> None:
    config = parse_config(bind(recipe, llama_models))
    check_round_trip(config)
    plan = plan_for(config, sources)
    assert plan is not None
    assert plan.method == recipe["merge_method"]
    assert plan.num_layers == expected_layers(recipe)
    out_dtype = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[
        recipe.get("out_dtype") or recipe.get("dtype") or "float32"]
    assert {j.dtype for j in plan.jobs} == {out_dtype}  # the fixtures hold only floats


@pytest.mark.slow
@examples(600)
@given(mutated=mutated_recipes())
def test_mutated_recipes_parse_or_fail_cleanly(mutated: tuple[Any, list[str]], llama_models,
                                               sources):
    check_mutated(mutated[0], llama_models, sources)


@pytest.mark.slow
@examples(300)
@given(mutated=mutated_recipes(structural=False))
def test_doubtful_values_plan_or_fail_cleanly(mutated: tuple[Any, list[str]], llama_models,
                                              sources):
    check_mutated(mutated[0], llama_models, sources)


def check_mutated(recipe: Any, llama_models: list[Path],
                  sources: dict[str, ModelSource]) -> None:
    data = bind(recipe, llama_models)
    config = parse_outcome(data)
    if config is None:
        event("recipe error")
        return
    check_round_trip(config)
    try:
        plan = plan_for(config, sources)
    except MergeError as exc:
        check_clean_error(exc)
        event("plan error")
        return
    event("hub model: not planned" if plan is None else "plan")
    assert plan is None or isinstance(plan, MergePlan)


# -- recipe files ------------------------------------------------------------------------

def load_outcome(path: Path) -> None:
    """load_config on the file: a recipe or a clean recipe error."""
    try:
        config = load_config(path)
    except MergeError as exc:
        check_clean_error(exc)
        return
    assert isinstance(config, MergeConfiguration)


@examples(200)
@given(blob=st.binary(max_size=200))
def test_random_bytes_file_parses_or_fails_cleanly(blob: bytes, tmp_path: Path):
    path = tmp_path / "recipe.yml"  # rewritten by every example
    path.write_bytes(blob)
    load_outcome(path)


YAML_PIECES = st.sampled_from([
    "merge_method: linear\n", "models:\n", "  - model: org/a\n", "    parameters: {weight: 1}\n",
    "slices:\n", "  - sources:\n", "      - {model: org/b, layer_range: [0, 2]}\n",
    "base_model: &b org/a\n", "tokenizer_source: *b\n", "x: *undefined\n", "<<: {a: 1}\n",
    "? [1, 2]\n: 3\n", "dtype: !!binary aGk=\n", "parameters: !!set {a, b}\n",
    "when: 2001-01-01\n", "weight: 1e999\n", "weight: .inf\n", "n: 0x1F\n", "\t- bad\n",
    "---\n", "...\n", "%YAML 1.1\n", "key: 'unterminated\n", "[\n", "{\n", "- \n", ": :\n",
    "a: !!python/object/apply:os.system ['true']\n", "b: !!python/name:os.system\n",
    "c: !custom 1\n", "\ufeff", "\x00", "\u2028", "# comment\n", "&a [*a]\n",
    "huge: " + "9" * 400 + "\n", "deep: " + "[" * 40 + "]" * 40 + "\n",
    "weight: &r [*r]\n", "parameters: {weight: &w [1, *w]}\n", "chat_template: |\n  {{ x }}\n",
    "merge_method: ties\n", "parameters: {weight: 1, weight: 2}\n", "weight: 1e39\n",
    "weight: .nan\n", "t: '0.5'\n", "t: true\n", "layer_range: [false, true]\n",
    "l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1]\n",
    *(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 8)}]\n" for i in range(1, 8)),
])


@pytest.mark.slow
@examples(300)
@given(text=st.one_of(st.text(max_size=200),
                      st.lists(YAML_PIECES, max_size=8).map("".join),
                      st.builds(lambda a, b: a + b, st.lists(YAML_PIECES, max_size=6).map(
                          "".join), st.text(max_size=20))))
def test_random_text_file_parses_or_fails_cleanly(text: str, tmp_path: Path):
    path = tmp_path / "recipe.yml"
    path.write_text(text, encoding="utf-8")
    load_outcome(path)


# -- recipe files: duplicate keys, aliases, numbers float32 cannot hold ---------------------

HUB = [Path("org/a"), Path("org/b"), Path("org/c")]  # parsing never opens a model
# a mapping entry as dump_yaml writes it: indentation, a list item's dash, the key, the rest
KEY_LINE = re.compile(r"^( *)(- )?([A-Za-z_][\w./-]*):(.*)$")


def as_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yml"  # rewritten by every example
    path.write_text(text, encoding="utf-8")
    return path


@examples(100)
@given(recipe=valid_recipes(), data=st.data())
def test_duplicate_keys_are_refused_with_their_line(recipe: dict, data: st.DataObject,
                                                    tmp_path: Path):
    lines = dump_yaml(bind(recipe, HUB)).splitlines()
    i = data.draw(st.sampled_from([n for n, line in enumerate(lines) if KEY_LINE.match(line)]))
    indent, dash, key, rest = KEY_LINE.match(lines[i]).groups()
    value = data.draw(st.sampled_from(["0", "linear", "[1, 2]", "{}", "null", "'x'"]))
    # the same key, one line before, at the same level: the one written later would win
    lines[i:i + 1] = [f"{indent}{dash or ''}{key}: {value}",
                      f"{indent}{'  ' if dash else ''}{key}:{rest}"]
    path = as_file(tmp_path, "\n".join(lines) + "\n")
    column = len(indent) + (3 if dash else 1)
    assert load_error(path) == (f"{path}:{i + 2}:{column}: duplicate key {key!r} (also on line "
                                f"{i + 1}); keep one of them")


def share_equal_values(data: Any, seen: dict[str, Any] | None = None) -> Any:
    """The data with equal lists and mappings as one object: YAML writes them once, with an
    anchor, and aliases after."""
    seen = {} if seen is None else seen
    if isinstance(data, dict):
        data = {k: share_equal_values(v, seen) for k, v in data.items()}
    elif isinstance(data, list):
        data = [share_equal_values(v, seen) for v in data]
    else:
        return data
    return seen.setdefault(repr(data), data) if data else data


@examples(60)
@given(recipe=valid_recipes())
def test_aliases_give_the_recipe_written_out(recipe: dict, tmp_path: Path):
    recipe = bind(recipe, HUB)
    text = yaml.safe_dump(share_equal_values(recipe), sort_keys=False)
    event("aliases" if "*id" in text else "no aliases")
    assert load_config(as_file(tmp_path, text)) == parse_config(recipe)


def alias_bomb(levels: int, fan: int) -> tuple[str, int]:
    """A flow list whose item i lists ``fan`` aliases of item i-1 (item 0: ``fan``
    numbers), and the values its aliases add."""
    items, size, added = [f"&b0 [{', '.join(['1'] * fan)}]"], 1 + fan, 0
    for i in range(1, levels):
        items.append(f"&b{i} [{', '.join([f'*b{i - 1}'] * fan)}]")
        added += fan * size
        size = 1 + fan * size
    return f"[{', '.join(items)}]", added


def _sites(recipe: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [p for p in _paths(recipe) if p and not isinstance(_get(recipe, p), dict | list)]


@examples(100)
@given(recipe=valid_recipes(), data=st.data(), levels=st.integers(1, 20),
       fan=st.integers(2, 12))
def test_alias_bombs_are_refused_fast(recipe: dict, data: st.DataObject, levels: int,
                                      fan: int, tmp_path: Path):
    recipe = bind(recipe, HUB)
    site = data.draw(st.sampled_from(_sites(recipe)))
    _get(recipe, site[:-1])[site[-1]] = "@@BOMB@@"
    bomb, added = alias_bomb(levels, fan)
    text = re.sub(r"'?@@BOMB@@'?", bomb, dump_yaml(recipe))
    path = as_file(tmp_path, text)
    refused = f": aliases expand the recipe past {MAX_ALIAS_VALUES} values; reuse smaller " \
        "blocks, or fewer times"
    if added > 1_000_000:  # a bomb: a gigabyte once validated and copied
        message = load_error(path)
        assert message.startswith(f"{path}:") and message.endswith(refused)
        event("a bomb")
        return
    try:  # a few shared blocks: a recipe, or refused for other reasons
        load_config(path)
    except MergeError as exc:
        check_clean_error(exc)
        assert added > 10_000 or not str(exc).endswith(refused)


# YAML spellings of numbers the merge's float32 math cannot hold, and what the error says
FLOAT32_MISFITS = {
    "1e39": "1e+39 does not fit in float32", "-1e39": "-1e+39 does not fit in float32",
    "1.0e+39": "1e+39 does not fit in float32", "1" + "0" * 39: "1e+39 does not fit in float32",
    "-1.0E40": "-1e+40 does not fit in float32", ".nan": "nan is not a finite number",
    ".inf": "inf is not a finite number", "-.inf": "-inf is not a finite number",
    ".NaN": "nan is not a finite number", "1e-50": "1e-50 is too small for float32",
}


def _number_sites(recipe: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Paths of every number set for a parameter: scalars, gradient anchors, filter values."""
    return [p for p in _paths(recipe)
            if any(part in ("parameters", "input_model_parameters") for part in p)
            and isinstance(_get(recipe, p), int | float)
            and not isinstance(_get(recipe, p), bool)]


def _setting_location(path: tuple[Any, ...]) -> str:
    """The YAML path of the parameter a number belongs to (where errors name it)."""
    end = max(i for i, part in enumerate(path) if part in ("parameters",
                                                            "input_model_parameters"))
    end += 3 if path[end] == "input_model_parameters" else 2
    text = ""
    for part in path[:end]:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _refused_number(recipe: dict, data: st.DataObject, spelling: str,
                    tmp_path: Path) -> tuple[tuple, Path, str]:
    """A number site of ``recipe`` drawn and written as ``spelling`` in a recipe file: the
    site, the file, and the one clean error loading it gives."""
    recipe = bind(recipe, HUB)
    site = data.draw(st.sampled_from(_number_sites(recipe)))
    _get(recipe, site[:-1])[site[-1]] = "@@NUMBER@@"
    text = re.sub(r"'?@@NUMBER@@'?", spelling, dump_yaml(recipe))
    path = as_file(tmp_path, text)
    message = load_error(path)
    check_clean_error(MergeError(message))
    return site, path, message


@examples(100)
@given(recipe=valid_recipes().filter(lambda r: bool(_number_sites(r))), data=st.data(),
       spelling=st.sampled_from(sorted(FLOAT32_MISFITS)))
def test_numbers_float32_cannot_hold_are_refused_where_set(recipe: dict, data: st.DataObject,
                                                           spelling: str, tmp_path: Path):
    site, path, message = _refused_number(recipe, data, spelling, tmp_path)
    assert message.startswith(f"{path}: {_setting_location(site)}: "
                              f"{FLOAT32_MISFITS[spelling]}"), (site, message)


@examples(60)
@given(recipe=valid_recipes().filter(lambda r: bool(_number_sites(r))), data=st.data(),
       spelling=st.sampled_from(["'0.5'", '"1"', "true", "false", "'1e-5'", "no"]))
def test_strings_and_booleans_are_not_numbers(recipe: dict, data: st.DataObject,
                                              spelling: str, tmp_path: Path):
    site, path, message = _refused_number(recipe, data, spelling, tmp_path)
    assert message.startswith(f"{path}: {_setting_location(site)}: "), (site, message)


# -- regressions: each found by the properties above -----------------------------------------

def parse_error(data: Any) -> str:
    with pytest.raises(MergeError) as info:
        parse_config(data)
    assert info.value.exit_code == 2
    return str(info.value)


def load_error(path: Path) -> str:
    with pytest.raises(MergeError) as info:
        load_config(path)
    assert info.value.exit_code == 2
    return str(info.value)


LINEAR = {"merge_method": "linear", "models": [{"model": "org/a", "parameters": {"weight": 1}}]}


def test_key_with_a_line_break_is_quoted_in_the_location():
    message = parse_error({**LINEAR, "bad\nkey": 1, "": 2})
    assert message == ("recipe: 'bad\\nkey': unknown key; check its spelling and indentation; "
                       "'': unknown key; check its spelling and indentation")


def test_keys_are_named_as_written():
    recipe = {**LINEAR, "a[b": 1}
    recipe["models"] = [{"model": "org/a", "parameters": {"weight": 1, 3: 1}}]
    message = parse_error(recipe)
    assert "recipe: models[0].parameters.3: keys must be strings; quote the key" in message
    assert "a[b: unknown key" in message


def test_filter_entry_with_keys_of_mixed_types():
    recipe = {**LINEAR, "models": [{"model": "org/a",
                                    "parameters": {"weight": {"value": 1, 0: 2, "x": 3}}}]}
    assert parse_error(recipe) == (
        "recipe: models[0].parameters.weight: unknown key(s) 0, x in a {filter, value} entry; "
        "an entry has only 'filter' and 'value'")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), [0.5, float("nan")],
                                   [{"filter": "mlp", "value": float("inf")}, {"value": 1}]])
def test_non_finite_parameter_values_are_recipe_errors(value: Any):
    recipe = {**LINEAR, "models": [{"model": "org/a", "parameters": {"weight": value}}]}
    message = parse_error(recipe)
    assert message.startswith("recipe: models[0].parameters.weight: ")
    assert "is not a finite number; give a number" in message


def test_reference_and_key_with_line_breaks_stay_on_one_line():
    recipe = {**LINEAR, "models": [{"model": "org/a\nb", "parameters": {"weight": 1}}]}
    assert parse_error(recipe).startswith("recipe: models[0].model: 'org/a\\nb' is neither")
    recipe = {**LINEAR, "input_model_parameters": {"\n": {"weight": 1}}}
    assert parse_error(recipe) == ("recipe: input_model_parameters.'\\n': a model reference must "
                                   "be a non-empty string")
    recipe = {**LINEAR, "parameters": {"we\night": 1}}
    assert parse_error(recipe).startswith(
        "recipe: parameters.'we\\night': 'linear' has no parameter 'we\\night'")


def test_many_problems_are_capped():
    message = parse_error({**LINEAR, **{f"extra{i:02d}": i for i in range(20)}})
    assert message.count("unknown key") == 8
    assert message.endswith("; and 12 more problem(s)")


def test_non_utf8_recipe_file(tmp_path: Path):
    path = tmp_path / "recipe.yml"
    path.write_bytes(b"merge_method: linear\n\x80")
    assert load_error(path) == (f"{path}: not UTF-8 text (byte 0x80 at offset 21); save the "
                                "recipe as UTF-8 YAML")


def test_control_character_in_a_recipe_file(tmp_path: Path):
    path = tmp_path / "recipe.yml"
    path.write_text("merge_method: linear\x00\n")
    assert load_error(path) == (f"{path}: malformed YAML (unacceptable character #x0000 at "
                                "offset 20); fix the syntax")


def test_deeply_nested_recipe_file(tmp_path: Path):
    path = tmp_path / "recipe.yml"
    # past our limit (100), within libyaml's (1000), which some versions check first
    path.write_text("merge_method: " + "[" * 500 + "]" * 500 + "\n")
    assert load_error(path) == (f"{path}:1:114: malformed YAML (nested too deeply); flatten "
                                "the recipe")


def test_aliases_expanding_to_a_billion_values_are_cut_short(tmp_path: Path):
    lines = ['l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    lines += ["merge_method: linear", "models:", "  - model: org/a",
              "    parameters: {weight: *l8}"]  # 9**9 strings, if expanded
    path = tmp_path / "recipe.yml"
    path.write_text("\n".join(lines) + "\n")
    assert load_error(path) == (f"{path}:6:10: aliases expand the recipe past 100000 values; "
                                "reuse smaller blocks, or fewer times")


def test_python_tags_never_run(tmp_path: Path):
    marker = tmp_path / "ran"
    path = tmp_path / "recipe.yml"
    path.write_text(f"merge_method: !!python/object/apply:os.system ['touch {marker}']\n"
                    "models: [{model: org/a}]\n")
    assert "could not determine a constructor for the tag" in load_error(path)
    assert not marker.exists()


def test_invalid_per_model_value_names_the_model_entry(llama_models: list[Path], sources):
    a, b, c = (str(p) for p in llama_models)
    config = parse_config({"merge_method": "ties", "base_model": a, "parameters": {"weight": 1},
                           "models": [{"model": a}, {"model": b},
                                      {"model": c, "parameters": {"density": 3}}]})
    with pytest.raises(MergeError) as info:
        plan_for(config, sources)
    assert str(info.value).startswith(
        f"models[2]: density 3.0 is outside [0, 1] (model {c}, tensor ")
    assert str(info.value).endswith("; fix the value where it is set for this model")
