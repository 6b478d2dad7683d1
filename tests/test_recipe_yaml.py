"""Recipe YAML: libyaml where PyYAML has it, and both parsers refuse duplicate keys, alias
bombs and deep nesting with the line they are on."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from mergekit import recipe_yaml
from mergekit.config import load_config, parse_config
from mergekit.errors import MergeError
from mergekit.recipe_yaml import MAX_ALIAS_VALUES, MAX_DEPTH, PyLoader, load_yaml

LOADERS = [pytest.param(PyLoader, id="pyyaml")]
if yaml.__with_libyaml__:
    LOADERS.insert(0, pytest.param(recipe_yaml.LOADER, id="libyaml"))


@pytest.fixture(params=LOADERS)
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> type:
    """Each test runs with libyaml's parser and with PyYAML's own."""
    monkeypatch.setattr(recipe_yaml, "LOADER", request.param)
    return request.param


def load_error(text: str) -> str:
    with pytest.raises(MergeError) as info:
        load_yaml(text, "r.yml")
    assert info.value.exit_code == 2
    message = str(info.value)
    assert "\n" not in message
    return message


def test_libyaml_parses_when_pyyaml_has_it():
    if not yaml.__with_libyaml__:
        pytest.skip("PyYAML without libyaml")
    assert issubclass(recipe_yaml.LOADER, yaml.cyaml.CParser)


def test_same_data_as_safe_load(loader: type):
    text = ("merge_method: ties\nbase_model: &b org/a\nmodels:\n  - model: *b\n"
            "  - model: org/c\n    parameters: {weight: [0, 0.5, 1], density: 0.5}\n"
            "parameters: {normalize: yes, t: .inf, n: ~, when: 2001-01-01, x: 0x1F}\n")
    assert load_yaml(text, "r.yml") == yaml.safe_load(text)


@pytest.mark.parametrize("text, value", [("1e-5", 1e-5), ("1E5", 1e5), ("-2.5e3", -2500.0),
                                         (".5e1", 5.0), ("1e39", 1e39), ("1.0e+5", 1e5),
                                         ("'1e-5'", "1e-5"), ("12", 12), ("1_000", 1000),
                                         ("e5", "e5"), ("1e", "1e"), ("0x1e5", 0x1E5)])
def test_exponent_floats_as_yaml_1_2_reads_them(loader: type, text: str, value: object):
    # YAML 1.1 (PyYAML) makes 1e-5 a string: a recipe's tol or epsilon must be a number
    got = load_yaml(f"v: {text}\n", "r.yml")["v"]
    assert got == value and type(got) is type(value)


def test_strings_written_as_exponent_floats_survive_the_recipe_copy(loader: type):
    recipe = {"merge_method": "linear", "models": [{"model": "org/a", "parameters": {
        "weight": [{"filter": "1e5", "value": 1e-5}, {"value": 1}]}}]}
    config = parse_config(recipe)
    text = config.to_yaml()
    assert "'1e5'" in text
    assert parse_config(load_yaml(text, "r.yml")) == config


# -- duplicate keys --------------------------------------------------------------------------

@pytest.mark.parametrize("text, where, key, first", [
    ("merge_method: linear\nmodels: []\nmerge_method: ties\n", "3:1", "merge_method", 1),
    ("models:\n  - model: org/a\n    parameters:\n      weight: 1\n      weight: 2\n",
     "5:7", "weight", 4),
    ("models:\n  - {model: org/a, model: org/b}\n", "2:20", "model", 2),
    ("a: 1\n'a': 2\n", "2:1", "a", 1),  # quoting does not make another key
    ("x: &k {a: 1}\ny:\n  <<: *k\n  <<: *k\n", "4:3", "<<", 3),
])
def test_duplicate_keys_name_the_line_and_the_key(loader: type, text: str, where: str,
                                                  key: str, first: int):
    assert load_error(text) == (f"r.yml:{where}: duplicate key {key!r} (also on line "
                                f"{first}); keep one of them")


def test_merge_keys_may_be_overridden(loader: type):
    text = "base: &p {weight: 1, density: 0.5}\nmine:\n  <<: *p\n  weight: 2\n"
    assert load_yaml(text, "r.yml")["mine"] == {"weight": 2, "density": 0.5}


def test_duplicate_key_in_a_recipe_file(tmp_path: Path):
    path = tmp_path / "r.yml"
    path.write_text("merge_method: linear\nmodels:\n  - model: org/a\n    parameters:\n"
                    "      weight: 1\nmerge_method: passthrough\n")
    with pytest.raises(MergeError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}:6:1: duplicate key 'merge_method' (also on line 1); "
                               "keep one of them")


# -- aliases ---------------------------------------------------------------------------------

def test_a_few_aliases_give_the_written_out_recipe(loader: type):
    shared = ("merge_method: linear\nshared: &p {weight: [0.2, 0.8]}\n"
              "models:\n  - {model: org/a, parameters: *p}\n  - {model: org/b, parameters: *p}\n")
    data = load_yaml(shared, "r.yml")
    assert data.pop("shared") == {"weight": [0.2, 0.8]}
    written = {"merge_method": "linear", "models": [
        {"model": m, "parameters": {"weight": [0.2, 0.8]}} for m in ("org/a", "org/b")]}
    assert parse_config(data) == parse_config(written)


def bomb(levels: int, fan: int) -> str:
    """l0 holds ``fan`` numbers; each level lists ``fan`` aliases of the one below."""
    lines = [f"l0: &l0 [{', '.join(['1'] * fan)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\nmerge_method: linear\n"


def alias_values(levels: int, fan: int) -> int:
    """Values the aliases of ``bomb`` add: level i repeats level i-1 (with its own node)
    ``fan`` times."""
    size, added = 1 + fan, 0
    for _ in range(1, levels):
        added += fan * size
        size = 1 + fan * size
    return added


@pytest.mark.parametrize("levels, fan", [(2, 300), (4, 20), (9, 9), (30, 10)])
def test_alias_expansion_is_capped(loader: type, levels: int, fan: int):
    text = bomb(levels, fan)
    if alias_values(levels, fan) <= MAX_ALIAS_VALUES:
        assert load_yaml(text, "r.yml")["merge_method"] == "linear"
        return
    message = load_error(text)
    assert message.startswith("r.yml:") and message.endswith(
        f": aliases expand the recipe past {MAX_ALIAS_VALUES} values; reuse smaller blocks, "
        "or fewer times")


def test_alias_bomb_is_refused_fast_and_small(loader: type):
    # 10**30 values if expanded; refused from the node counts, before any copy is made
    text = bomb(30, 10)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        load_error(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, peak
    assert time.perf_counter() - started < 10  # under a second unloaded


def test_alias_inside_its_own_value(loader: type):
    assert load_error("merge_method: linear\nx: &r [1, *r]\n") == (
        "r.yml:2:11: the alias *r is inside the value it names; a recipe value cannot hold "
        "itself")


LIBYAML_DEPTH = 1000  # libyaml 0.2.5's limit on flow nesting


# -- nesting and characters -------------------------------------------------------------------

@pytest.mark.parametrize("text, where", [
    # the mapping is level 1: the first bracket, at column 15, level 2
    ("merge_method: " + "[" * 100_000 + "]" * 100_000, f"1:{15 + MAX_DEPTH - 1}"),
    ("merge_method:\n" + "- " * 100_000 + "x", f"2:{1 + 2 * (MAX_DEPTH - 1)}"),
], ids=["flow", "block"])
def test_deep_nesting_is_refused_where_it_passes_the_limit(loader: type, text: str,
                                                           where: str):
    # libyaml's composer overflows the C stack on this, and its scanner takes time
    # quadratic in flow nesting: the parse stops at the limit
    started = time.perf_counter()
    message = load_error(text + "\n")
    tail = ": malformed YAML (nested too deeply); flatten the recipe"
    # libyaml 0.2.5's scanner reads flow nesting ahead and stops at its own limit (1000)
    assert message == f"r.yml:{where}{tail}" or (
        loader is not PyLoader and text.startswith("merge_method: [")
        and message == f"r.yml:1:{15 + LIBYAML_DEPTH - 1}{tail}"), message
    assert time.perf_counter() - started < 10


def test_unacceptable_character_offset_counts_characters(loader: type):
    # libyaml counts bytes: the two-byte é before the control character
    assert load_error("é: 1\n\x01") == ("r.yml: malformed YAML (unacceptable character #x0001 "
                                        "at offset 5); fix the syntax")
