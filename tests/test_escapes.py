"""Tensor names from a hostile safetensors header reach the terminal escaped: no ESC, BEL or
line break of theirs in --dry-run's plan, in warnings or in errors."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_state, run_cli, write_recipe
from hostile import assert_nothing_partial, tree_digest
from safetensors.torch import save_file

from mergekit.printable import printable

# outside the layers, so the plan copies it as one of the tensors before them
HOSTILE = "model.evil\x1b[31m\x07\nname.weight"
SHOWN = "model.evil\\x1b[31m\\x07\\nname.weight"
# control characters other than the line ends print() writes
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


@pytest.fixture(scope="module")
def hostile_model(llama_models, tmp_path_factory) -> Path:
    """A test model with one more tensor, named HOSTILE, holding a NaN (for the warning)."""
    folder = tmp_path_factory.mktemp("hostile") / "model"
    shutil.copytree(llama_models[0], folder)
    state = load_state(folder)
    state[HOSTILE] = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def recipe(tmp_path: Path, model: Path) -> Path:
    return write_recipe(tmp_path / "r.yml", {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(model), "layer_range": [0, 4]}]}]})


def assert_escaped(text: str) -> None:
    assert not CONTROL.search(text), repr(text)
    assert not any(line.startswith("name.weight") for line in text.splitlines()), text


def test_dry_run_escapes_tensor_names(tmp_path, hostile_model):
    proc = run_cli("mergekit.cli.yaml_cmd", recipe(tmp_path, hostile_model), tmp_path / "out",
                   "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert_escaped(proc.stdout)
    assert_escaped(proc.stderr)
    shown = [line for line in proc.stdout.splitlines() if line.startswith(SHOWN + " ")]
    assert len(shown) == 1 and f"model:{SHOWN}]" in shown[0], proc.stdout


def test_warning_escapes_tensor_names(tmp_path, hostile_model):
    out = tmp_path / "out"
    proc = run_cli("mergekit.cli.yaml_cmd", recipe(tmp_path, hostile_model), out, "-q",
                   "--no-copy-tokenizer")
    assert proc.returncode == 0, proc.stderr
    assert_escaped(proc.stdout + proc.stderr)
    assert (f"WARNING: model {hostile_model}: tensor {SHOWN} holds NaN or Inf values"
            in proc.stderr.splitlines()[0]), proc.stderr
    assert HOSTILE in load_state(out)  # the name itself is kept as it is


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_error_escapes_tensor_names(tmp_path, hostile_model, verbose):
    out = tmp_path / "out"
    recipe_file = recipe(tmp_path, hostile_model)
    watched = [tmp_path, hostile_model]
    before = [tree_digest(d, skip=[out]) for d in watched]
    proc = run_cli("mergekit.cli.yaml_cmd", recipe_file, out, "-q", "--strict-finite",
                   "--no-copy-tokenizer",
                   *(["-v"] if verbose else []))
    assert proc.returncode == 1, proc.stderr
    assert_escaped(proc.stdout + proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: model {hostile_model}: tensor {SHOWN} holds NaN or Inf values; "
                      "fix the input model, or drop --strict-finite to merge anyway"]
    if not verbose:
        assert proc.stderr.splitlines() == errors
    else:
        assert "Traceback" in proc.stderr
    assert [tree_digest(d, skip=[out]) for d in watched] == before
    assert_nothing_partial(out)


def test_printable_escapes_only_unprintable_characters():
    assert printable("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert printable("naïve/ünïcode €") == "naïve/ünïcode €"
    assert printable(HOSTILE) == SHOWN
    assert printable("a\tb\rc\x00d\x7fe\x9bf\u202eg") == "a\\tb\\rc\\x00d\\x7fe\\x9bf\\u202eg"
    assert printable("one\ntwo\x1b", keep="\n") == "one\ntwo\\x1b"
