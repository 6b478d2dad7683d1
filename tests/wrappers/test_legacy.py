"""mergekit-legacy: flag translation, usage errors, and an end-to-end merge that equals the
mergekit-yaml run of the recipe it prints."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_state, read_json, run_cli

from mergekit.config import parse_config
from mergekit.wrappers.legacy import legacy_recipe

# end to end through the command line: the whole suite runs them, -m "not slow" not
pytestmark = pytest.mark.slow

LEGACY = "mergekit.cli.legacy_cmd"


def legacy(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_cli(LEGACY, *args)


def translate(**flags: object) -> dict:
    """legacy_recipe with the command line's defaults for every flag not given."""
    defaults: dict[str, object] = dict(
        base_model=None, merges=[], weights=[], densities=[], method="ties", normalize=True,
        int8_mask=False, bf16=False, naive_count=False)
    return legacy_recipe(**{**defaults, **flags})


# -- translation, field by field ---------------------------------------------------------


def test_ties_one_weight_and_density_per_merge_in_order():
    got = translate(base_model="org/base", merges=["org/m1", "org/m2"],
                    weights=[0.3, 0.5], densities=[0.5, 0.7])
    assert got == {
        "merge_method": "ties",
        "base_model": "org/base",
        "models": [
            {"model": "org/m1", "parameters": {"weight": 0.3, "density": 0.5}},
            {"model": "org/m2", "parameters": {"weight": 0.5, "density": 0.7}},
        ],
        "parameters": {"normalize": True},
    }


def test_one_weight_and_density_apply_to_every_merge():
    got = translate(base_model="b", merges=["m1", "m2", "m3"], weights=[0.25],
                    densities=[0.6])
    assert got["models"] == [
        {"model": m, "parameters": {"weight": 0.25, "density": 0.6}}
        for m in ("m1", "m2", "m3")
    ]


def test_density_is_optional_for_ties():
    got = translate(base_model="b", merges=["m1", "m2"], weights=[1.0, 2.0])
    assert got["models"] == [{"model": "m1", "parameters": {"weight": 1.0}},
                             {"model": "m2", "parameters": {"weight": 2.0}}]


def test_switches_become_parameters_and_dtype():
    got = translate(base_model="b", merges=["m"], weights=[1.0], normalize=False,
                    int8_mask=True, bf16=True, naive_count=True)
    assert got == {
        "merge_method": "ties",
        "base_model": "b",
        "models": [{"model": "m", "parameters": {"weight": 1.0}}],
        "parameters": {"normalize": False, "int8_mask": True, "consensus": "count"},
        "dtype": "bfloat16",
    }


def test_linear_without_base():
    got = translate(method="linear", merges=["m1", "m2"], weights=[1.0, 3.0])
    assert got == {
        "merge_method": "linear",
        "models": [{"model": "m1", "parameters": {"weight": 1.0}},
                   {"model": "m2", "parameters": {"weight": 3.0}}],
        "parameters": {"normalize": True},
    }


def test_slerp_single_weight_is_t():
    got = translate(method="slerp", base_model="b", merges=["m"], weights=[0.25])
    assert got == {
        "merge_method": "slerp",
        "base_model": "b",
        "models": [{"model": "b"}, {"model": "m"}],
        "parameters": {"t": 0.25},
    }


def test_method_without_weights_or_normalize():
    got = translate(method="model_stock", base_model="b", merges=["m1", "m2"])
    assert got == {"merge_method": "model_stock", "base_model": "b",
                   "models": [{"model": "m1"}, {"model": "m2"}]}


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_ties", "breadcrumbs_ties",
                                    "della", "ties"])
def test_other_known_methods_give_valid_recipes(method):
    recipe = translate(method=method, base_model="b", merges=["m1", "m2"], weights=[0.5],
                       densities=[0.5] if method != "task_arithmetic" else [],
                       naive_count=method != "task_arithmetic")
    assert recipe["merge_method"] == method
    config = parse_config(recipe, "test")  # raises on anything the engine rejects
    assert config.merge_method == method


# -- usage errors (exit 2, before anything is read or written) ---------------------------

ERRORS = {
    "weight count": (
        ["--base-model", "b", "--merge", "m1", "--merge", "m2",
         "--weight", "0.1", "--weight", "0.2", "--weight", "0.3"],
        "error: --weight: given 3 times for 2 --merge models; give it once (for all) or 2 "
        "times (once per --merge, in order)"),
    "density count": (
        ["--base-model", "b", "--merge", "m1", "--merge", "m2", "--merge", "m3",
         "--weight", "1", "--density", "0.5", "--density", "0.5"],
        "error: --density: given 2 times for 3 --merge models; give it once (for all) or 3 "
        "times (once per --merge, in order)"),
    "no weight": (
        ["--base-model", "b", "--merge", "m1", "--merge", "m2"],
        "error: --weight: not given; method 'ties' needs a weight for each of the 2 --merge "
        "models; give it once (for all) or 2 times"),
    "density without density method": (
        ["--method", "linear", "--merge", "m1", "--weight", "1", "--density", "0.5"],
        "error: --density: method 'linear' takes no density; drop --density"),
    "weight without weight method": (
        ["--method", "model_stock", "--base-model", "b", "--merge", "m1", "--merge", "m2",
         "--weight", "1"],
        "error: --weight: method 'model_stock' takes no weight; drop --weight"),
    "slerp two weights": (
        ["--method", "slerp", "--base-model", "b", "--merge", "m", "--weight", "0.5",
         "--weight", "0.2"],
        "error: --weight: slerp takes exactly one --weight (its t), given 2; give --weight T "
        "once"),
    "slerp no weight": (
        ["--method", "slerp", "--base-model", "b", "--merge", "m"],
        "error: --weight: slerp takes exactly one --weight (its t), given 0"),
    "slerp two merges": (
        ["--method", "slerp", "--base-model", "b", "--merge", "m1", "--merge", "m2",
         "--weight", "0.5"],
        "error: --merge: slerp interpolates --base-model and one --merge model; give "
        "--base-model and exactly one --merge"),
    "slerp no base": (
        ["--method", "slerp", "--merge", "m", "--weight", "0.5"],
        "error: --merge: slerp interpolates --base-model and one --merge model"),
    "slerp density": (
        ["--method", "slerp", "--base-model", "b", "--merge", "m", "--weight", "0.5",
         "--density", "0.5"],
        "error: --density: method 'slerp' takes no density"),
    "naive count with linear": (
        ["--method", "linear", "--merge", "m", "--weight", "1", "--naive-count"],
        "error: --naive-count: method 'linear' elects no sign; use it with ties"),
    "unknown method": (
        ["--method", "tie", "--base-model", "b", "--merge", "m", "--weight", "1"],
        "error: --method: unknown method 'tie'; did you mean 'ties'? (known: "),
    "ties without base": (
        ["--merge", "m", "--weight", "1"],
        "error: --base-model: method 'ties' needs a base model; give --base-model"),
    "no merge": (
        ["--base-model", "b"],
        "error: --merge: no model to merge; give --merge MODEL at least once"),
    "bad shard size": (
        ["--base-model", "b", "--merge", "m", "--weight", "1", "--out-shard-size", "5X"],
        "error: --out-shard-size: '5X' is not a size"),
    "weight nan": (
        ["--base-model", "b", "--merge", "m", "--weight", "nan"],
        "error: --weight: nan is not a finite number; give a number\n"),
    "density inf": (
        ["--base-model", "b", "--merge", "m", "--weight", "1", "--density", "-inf"],
        "error: --density: -inf is not a finite number; give a number\n"),
    "weight past float32": (
        ["--method", "linear", "--merge", "m1", "--merge", "m2", "--weight", "1",
         "--weight", "1e39"],
        "error: --weight: 1e+39 does not fit in float32 (largest magnitude 3.403e+38); give a "
        "smaller number\n"),
    "slerp t inf": (
        ["--method", "slerp", "--base-model", "b", "--merge", "m", "--weight", "inf"],
        "error: --weight: inf is not a finite number; give a number\n"),
}


@pytest.mark.parametrize("args, message", ERRORS.values(), ids=ERRORS.keys())
def test_usage_errors(tmp_path, args, message):
    out = tmp_path / "out"
    proc = legacy(out, *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_unknown_method_lists_known_methods(tmp_path):
    proc = legacy(tmp_path / "out", "--method", "slurp", "--merge", "m", "--weight", "1")
    assert proc.returncode == 2
    assert "did you mean 'slerp'?" in proc.stderr
    for known in ("linear", "slerp", "ties", "passthrough"):
        assert known in proc.stderr


def test_missing_out_without_print_yaml(tmp_path):
    proc = run_cli(LEGACY, "--base-model", "b", "--merge", "m", "--weight", "1",
                   cwd=tmp_path)
    assert proc.returncode == 2
    assert "error: OUT: no output folder given; name one, or use --print-yaml" in proc.stderr
    assert list(tmp_path.iterdir()) == []


# -- end to end: the real entry point, and the printed recipe through mergekit-yaml --------

SHARD = "20k"  # forces several shards, so the shared merge flags reach the engine


@pytest.fixture(scope="module")
def runs(llama_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("legacy")
    base, m1, m2 = (str(p) for p in llama_models)
    flags = ["--base-model", base, "--merge", m1, "--weight", "0.3", "--density", "0.5",
             "--merge", m2, "--weight", "0.5", "--density", "0.5",
             "--out-shard-size", SHARD, "--quiet"]
    legacy_out = root / "legacy" / "merged"
    merged = legacy(legacy_out, *flags)
    printed_out = root / "printed" / "merged"
    printed = legacy(printed_out, *flags, "--print-yaml")
    recipe = root / "recipe.yml"
    recipe.write_text(printed.stdout)
    yaml_out = root / "yaml" / "merged"
    via_yaml = run_cli("mergekit.cli.yaml_cmd", recipe, yaml_out, "--out-shard-size", SHARD,
                       "--quiet")
    return dict(models=(base, m1, m2), merged=merged, legacy_out=legacy_out,
                printed=printed, printed_out=printed_out, via_yaml=via_yaml,
                yaml_out=yaml_out)


def ties_expected(base: torch.Tensor, others: list[torch.Tensor], weights: list[float],
                  density: float) -> torch.Tensor:
    """TIES from the spec: trim each task vector to its top int(density * numel)
    magnitudes, elect the sign of the weighted sum, average the agreeing entries."""
    weighted = []
    for x, w in zip(others, weights):
        delta = (x - base).flatten()
        k = int(density * delta.numel())
        order = torch.argsort(delta.abs(), descending=True)
        trimmed = torch.zeros_like(delta)
        trimmed[order[:k]] = delta[order[:k]]
        weighted.append(w * trimmed)
    total = sum(weighted)
    mixed = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for wd, w in zip(weighted, weights):
        agree = torch.where(total >= 0, wd > 0, wd < 0)
        mixed += torch.where(agree, wd, 0.0)
        divisor += torch.where(agree, w, 0.0)
    divisor[divisor == 0] = 1.0
    return (base.flatten() + mixed / divisor).reshape(base.shape)


@pytest.mark.slow
def test_legacy_merge_gives_ties_of_the_flags(runs):
    proc = runs["merged"]
    assert proc.returncode == 0, proc.stderr
    out = runs["legacy_out"]
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    base, m1, m2 = (load_state(p) for p in runs["models"])
    got = load_state(out)
    assert set(got) == set(base)
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32
        expected = ties_expected(base[name], [m1[name], m2[name]], [0.3, 0.5], 0.5)
        torch.testing.assert_close(tensor, expected, atol=1e-6, rtol=1e-5, msg=name)
    assert read_json(out / "config.json")["num_hidden_layers"] == 4


@pytest.mark.slow
def test_print_yaml_prints_the_recipe_and_merges_nothing(runs):
    proc = runs["printed"]
    assert proc.returncode == 0, proc.stderr
    assert not runs["printed_out"].exists()
    base, m1, m2 = runs["models"]
    assert yaml.safe_load(proc.stdout) == {
        "merge_method": "ties",
        "base_model": base,
        "models": [{"model": m1, "parameters": {"weight": 0.3, "density": 0.5}},
                   {"model": m2, "parameters": {"weight": 0.5, "density": 0.5}}],
        "parameters": {"normalize": True},
    }


@pytest.mark.slow
def test_printed_recipe_through_mergekit_yaml_is_byte_identical(runs):
    assert runs["merged"].returncode == 0, runs["merged"].stderr
    assert runs["via_yaml"].returncode == 0, runs["via_yaml"].stderr
    assert_same_folder(runs["legacy_out"], runs["yaml_out"])


def assert_same_folder(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    assert Path("model.safetensors.index.json") in files_a
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
