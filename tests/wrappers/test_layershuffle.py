"""mergekit-layershuffle: the random draw (reproducible, by weight, covering every layer
once), usage errors, and an end-to-end merge whose layers come from the drawn models."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_llama, load_state, read_json, run_cli
from hostile import assert_nothing_partial, tree_digest

from mergekit.config import parse_config
from mergekit.wrappers.layershuffle import shuffle_recipe

# end to end through the command line: the whole suite runs them, -m "not slow" not
pytestmark = pytest.mark.slow

SHUFFLE = "mergekit.cli.layershuffle_cmd"


def shuffle(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_cli(SHUFFLE, *args)


def picks_of(recipe: dict) -> list[str]:
    """The model of each layer position, checking the slices tile [0, n) in order with
    one source each, and that consecutive slices never come from one model."""
    assert recipe["merge_method"] == "passthrough"
    assert set(recipe) == {"merge_method", "slices"}
    picks: list[str] = []
    previous = None
    for sl in recipe["slices"]:
        assert set(sl) == {"sources"}
        (source,) = sl["sources"]
        assert set(source) == {"model", "layer_range"}
        start, end = source["layer_range"]
        assert start == len(picks) and end > start
        assert source["model"] != previous  # runs from one model are merged into one slice
        previous = source["model"]
        picks += [source["model"]] * (end - start)
    return picks


# -- the draw --------------------------------------------------------------------------------


def test_only_model_with_weight_gives_one_slice():
    got = shuffle_recipe(["a", "b", "c"], [0.0, 2.0, 0.0], 6, seed=1)
    assert got == {"merge_method": "passthrough",
                   "slices": [{"sources": [{"model": "b", "layer_range": [0, 6]}]}]}


def test_slices_cover_every_layer_once_in_order():
    for seed in range(20):
        got = shuffle_recipe(["a", "b", "c"], [1.0, 1.0, 1.0], 7, seed)
        assert len(picks_of(got)) == 7
        parse_config(got, "test")  # a recipe the engine accepts


def test_same_seed_same_recipe_different_seeds_differ():
    first = shuffle_recipe(["a", "b"], [0.5, 0.5], 16, seed=42)
    assert shuffle_recipe(["a", "b"], [0.5, 0.5], 16, seed=42) == first
    drawn = {yaml.safe_dump(shuffle_recipe(["a", "b"], [0.5, 0.5], 16, s)) for s in range(10)}
    assert len(drawn) > 5


def test_weight_zero_is_never_picked():
    for seed in range(30):
        picks = picks_of(shuffle_recipe(["a", "b", "c"], [1.0, 0.0, 1.0], 12, seed))
        assert "b" not in picks
        assert len(picks) == 12


def test_picks_follow_the_weights():
    picks = picks_of(shuffle_recipe(["a", "b"], [3.0, 1.0], 4000, seed=0))
    share = Counter(picks)["a"] / len(picks)
    assert 0.72 < share < 0.78  # 0.75 expected; 4000 draws put 3 sd at ~0.02


# -- usage errors ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory) -> Path:
    return build_llama(tmp_path_factory.mktemp("deep") / "six", seed=5, layers=6)


def test_weight_count_mismatch(tmp_path, llama_models):
    a, b, _ = llama_models
    out = tmp_path / "out"
    proc = shuffle(out, "--model", a, "--weight", "0.5", "--model", b)
    assert proc.returncode == 2
    assert ("error: --weight: given 1 times for 2 --model; give one --weight per --model, "
            "in order") in proc.stderr
    assert not out.exists()


def test_different_layer_counts(tmp_path, llama_models, six_layers):
    a = llama_models[0]
    out = tmp_path / "out"
    proc = shuffle(out, "--model", a, "--weight", "1", "--model", six_layers, "--weight", "1")
    assert proc.returncode == 2
    assert (f"error: --model: the models have different layer counts ({a}: 4, "
            f"{six_layers}: 6); layershuffle needs models of the same depth") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_no_model(tmp_path):
    out = tmp_path / "out"
    proc = shuffle(out)
    assert proc.returncode == 2
    assert "error: --model: no model given; give --model at least once" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("weights", [("1", "-1"), ("0", "0")])
def test_weights_need_a_positive_sum(tmp_path, llama_models, weights):
    a, b, _ = llama_models
    proc = shuffle(tmp_path / "out", "--model", a, "--weight", weights[0],
                   "--model", b, "--weight", weights[1])
    assert proc.returncode == 2
    assert "error: --weight: weights must be non-negative with a positive sum" in proc.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_weight_that_is_not_a_finite_number(tmp_path, llama_models, value):
    a, b, _ = llama_models
    out = tmp_path / "out"
    before = tree_digest(tmp_path)
    proc = shuffle(out, "--model", a, "--weight", value, "--model", b, "--weight", "1")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"error: --weight: {value} is not a finite number; give a "
                           "non-negative number\n")
    assert tree_digest(tmp_path) == before
    assert_nothing_partial(out)


def test_weights_whose_sum_is_not_finite(tmp_path, llama_models):
    a, b, _ = llama_models
    proc = shuffle(tmp_path / "out", "--model", a, "--weight", "1e308", "--model", b,
                   "--weight", "1e308")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ("error: --weight: the weights add up past the largest float; give "
                           "smaller weights (only their ratios matter)\n")


@pytest.mark.parametrize("where", ["missing/recipe.yml", "folder"])
def test_write_yaml_where_no_file_can_be(tmp_path, llama_models, where):
    a, b, _ = llama_models
    (tmp_path / "folder").mkdir()
    target, out = tmp_path / where, tmp_path / "out"
    before = tree_digest(tmp_path)
    proc = shuffle(out, "--model", a, "--weight", "1", "--model", b, "--weight", "1",
                   "--write-yaml", target)
    assert proc.returncode == 2, proc.stderr
    problem = ("is a folder; give a file path" if where == "folder" else
               f"{target.parent} is not an existing folder; create it first, or give a path "
               "in an existing folder")
    assert proc.stderr == f"error: --write-yaml {target}: {problem}\n"
    assert tree_digest(tmp_path) == before
    assert_nothing_partial(out)


def test_write_yaml_is_relative_to_the_current_folder(tmp_path, llama_models):
    a, b, _ = llama_models
    proc = run_cli(SHUFFLE, "--model", a, "--weight", "1", "--model", b, "--weight", "1",
                   "--print-yaml", "--write-yaml", "recipe.yml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load((tmp_path / "recipe.yml").read_text()) == yaml.safe_load(proc.stdout)


# -- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(llama_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("shuffle")
    models = [str(p) for p in llama_models]
    args = [a for m in models for a in ("--model", m, "--weight", "1")] + ["--random-seed", "3"]
    written = root / "written.yml"
    out = root / "shuffle" / "merged"
    merged = shuffle(out, *args, "--write-yaml", written, "--quiet")
    printed = shuffle(*args, "--print-yaml")
    yaml_out = root / "yaml" / "merged"
    via_yaml = run_cli("mergekit.cli.yaml_cmd", written, yaml_out, "--quiet")
    return dict(models=models, merged=merged, out=out, written=written, printed=printed,
                via_yaml=via_yaml, yaml_out=yaml_out)


@pytest.mark.slow
def test_each_output_layer_is_the_picked_models_layer(runs):
    assert runs["merged"].returncode == 0, runs["merged"].stderr
    recipe = yaml.safe_load(runs["written"].read_text())
    picks = picks_of(recipe)
    assert len(picks) == 4
    assert set(picks) <= set(runs["models"])
    # with this seed the draw mixes models (else the check below proves little)
    assert len(set(picks)) > 1
    states = {m: load_state(m) for m in runs["models"]}
    got = load_state(runs["out"])
    assert set(got) == set(states[picks[0]])
    for name, tensor in got.items():
        if ".layers." in name:
            layer = int(name.split(".")[2])
            source = picks[layer]
        else:  # embedding from the first slice, final norm and head from the last
            source = picks[0] if "embed" in name else picks[-1]
        assert torch.equal(tensor, states[source][name]), name
    assert read_json(runs["out"] / "config.json")["num_hidden_layers"] == 4


@pytest.mark.slow
def test_seeded_print_yaml_equals_written_yaml(runs):
    assert runs["printed"].returncode == 0, runs["printed"].stderr
    assert runs["printed"].stdout == runs["written"].read_text()


@pytest.mark.slow
def test_written_recipe_through_mergekit_yaml_is_byte_identical(runs):
    assert runs["via_yaml"].returncode == 0, runs["via_yaml"].stderr
    a, b = runs["out"], runs["yaml_out"]
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
