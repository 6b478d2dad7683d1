"""mergekit-methods: lists every merge method with its parameters and their defaults."""

from __future__ import annotations

import re

import pytest
from conftest import run_cli

from mergekit.methods.registry import all_methods

CMD = "mergekit.cli.methods_cmd"
METHODS = [
    "arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della",
    "della_linear", "karcher", "linear", "lora_cat", "model_stock", "multislerp", "nearswap",
    "nuslerp", "passthrough", "ram", "ramplus_tl", "sce", "slerp", "task_arithmetic", "ties",
]
# defaults the spec fixes, as the listing prints them
KNOWN_DEFAULTS = {
    "task_arithmetic": {"weight": "required", "normalize": "false", "lambda": "1.0"},
    "ties": {"density": "1.0", "normalize": "true", "lambda": "1.0", "consensus": "sum",
             "rescale": "false"},
    "dare_linear": {"rescale": "true", "rescale_mode": "l1", "normalize": "false"},
    "dare_ties": {"rescale": "true", "rescale_mode": "l1", "normalize": "false",
                  "consensus": "sum"},
    "breadcrumbs": {"gamma": "0.01", "rescale": "false", "normalize": "false"},
    "breadcrumbs_ties": {"gamma": "0.01", "rescale": "false"},
    "della": {"epsilon": "0.15", "normalize": "true", "rescale": "true"},
    "della_linear": {"epsilon": "0.15", "normalize": "false"},
    "model_stock": {"filter_wise": "false"},
    "nuslerp": {"weight": "required", "nuslerp_flatten": "true", "nuslerp_row_wise": "false"},
    "multislerp": {"normalize_weights": "true"},
    "karcher": {"max_iter": "10", "tol": "1e-05"},
    "sce": {"select_topk": "1.0"},
    "ram": {"epsilon": "1e-05"},
    "ramplus_tl": {"epsilon": "1e-05", "r": "0.1", "alpha": "0.2"},
    "nearswap": {"t": "required"},
    "slerp": {"t": "required"},
}
PARAM_LINE = re.compile(
    r"^  (\w+) \((\w+), (per model|global), ([^);]*)(?:; one of: ([^)]*))?\): (.+)$")
# the parameters with a closed set of values, and those values
KNOWN_CHOICES = {
    "consensus": ["sum", "count"],
    "rescale_mode": ["l1", "inverse_density"],
}


def parse_listing(text: str) -> dict[str, dict[str, tuple[str, str]]]:
    """method -> {param: (scope, default)} from the listing's text."""
    methods: dict[str, dict[str, tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            current = line.split(":", 1)[0]
            methods[current] = {}
        elif (m := PARAM_LINE.match(line)) is not None:
            assert current is not None
            methods[current][m.group(1)] = (m.group(3), m.group(4))
    return methods


def default_text(spec) -> str:
    if spec.required:
        return "required"
    if isinstance(spec.default, bool):
        return str(spec.default).lower()
    return str(spec.default)


@pytest.fixture(scope="module")
def listing_text() -> str:
    result = run_cli(CMD)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def listing(listing_text: str) -> dict[str, dict[str, tuple[str, str]]]:
    return parse_listing(listing_text)


@pytest.fixture(scope="module")
def listing_lines(listing_text: str) -> dict[str, dict[str, tuple[str, list[str] | None]]]:
    """method -> {param: (type word, allowed values or None)} from the listing's text."""
    methods: dict[str, dict[str, tuple[str, list[str] | None]]] = {}
    current = ""
    for line in listing_text.splitlines():
        if line and not line.startswith(" "):
            current = line.split(":", 1)[0]
            methods[current] = {}
        elif (m := PARAM_LINE.match(line)) is not None:
            choices = m.group(5).split(", ") if m.group(5) is not None else None
            methods[current][m.group(1)] = (m.group(2), choices)
    return methods


def test_every_method_is_listed(listing):
    assert sorted(listing) == METHODS
    assert sorted(all_methods()) == METHODS


def test_every_parameter_is_listed_with_its_default(listing):
    for name, method in all_methods().items():
        shown = listing[name]
        assert set(shown) == {p.name for p in method.params}, name
        for spec in method.params:
            scope = "per model" if spec.per_model else "global"
            assert shown[spec.name] == (scope, default_text(spec)), f"{name}.{spec.name}"


def test_defaults_the_spec_fixes(listing):
    for name, defaults in KNOWN_DEFAULTS.items():
        for param, default in defaults.items():
            assert listing[name][param][1] == default, f"{name}.{param}"
    assert listing["della"]["epsilon"][0] == "per model"
    assert listing["breadcrumbs"]["gamma"][0] == "per model"


def test_closed_sets_list_their_values(listing_lines):
    """A parameter with a closed set of values (a Literal) is listed with its type word
    and the values a recipe may give, never as 'Literal'."""
    seen = set()
    for method, lines in listing_lines.items():
        for name, (kind, choices) in lines.items():
            assert kind in ("float", "bool", "int", "str"), f"{method}.{name}: {kind}"
            if name in KNOWN_CHOICES:
                assert (kind, choices) == ("str", KNOWN_CHOICES[name]), f"{method}.{name}"
                seen.add(method)
            else:
                assert choices is None, f"{method}.{name}"
    assert {"ties", "dare_ties", "dare_linear", "della", "della_linear",
            "breadcrumbs_ties"} <= seen


def test_internal_fields_are_not_listed(listing):
    for name in ("dare_ties", "della", "arcee_fusion", "ties"):
        assert not {"seed", "magnitude_floor", "l1_scale"} & set(listing[name]), name


def test_one_method():
    result = run_cli(CMD, "ties")
    assert result.returncode == 0, result.stderr
    shown = parse_listing(result.stdout)
    assert list(shown) == ["ties"]
    assert set(shown["ties"]) == {"weight", "density", "normalize", "rescale", "lambda",
                                  "int8_mask", "consensus"}
    assert "https://arxiv.org/abs/2306.01708" in result.stdout


def test_unknown_method_suggests_the_closest():
    result = run_cli(CMD, "tie")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "unknown method 'tie'" in result.stderr
    assert "did you mean 'ties'?" in result.stderr
    assert "Traceback" not in result.stderr


def test_closed_pipe_is_not_an_error():
    """Output into a pipe whose reader has gone (`mergekit-methods | head`): no error."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write: a certain EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "mergekit.cli.methods_cmd"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert proc.returncode == 0, proc.stderr
    assert "error" not in proc.stderr.lower(), proc.stderr
