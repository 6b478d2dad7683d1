"""The benchmark script keeps working (its --quick mode: tiny models, one run) and its
figures mean what they say."""

import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _benchmarks_module(name: str):
    """A script of benchmarks/ imported as a module."""
    import importlib

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


@pytest.mark.slow
def test_quick_mode_reports_the_merge_it_ran(tmp_path, monkeypatch):
    """``bench.py --quick`` (run as the script runs, in this process: only the merge it
    times is a subprocess) merges its tiny models and reports figures that agree with
    independent ones: the bytes written are the output's file sizes, the output is the
    float32 weighted mean of the inputs in bfloat16, the times fit within the time the
    whole run took and the peak RSS is a plausible process size."""
    import shutil

    import torch
    from conftest import load_state

    bench = _benchmarks_module("bench")
    kept: list[Path] = []
    real_rmtree = shutil.rmtree

    def keep_outputs(path, *args, **kwargs):  # the output is removed once measured
        if Path(path).name == "out" and Path(path).is_dir():
            kept.append(shutil.copytree(path, tmp_path / f"kept{len(kept)}"))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", keep_outputs)
    table_file = tmp_path / "table.md"
    monkeypatch.setattr(sys, "argv", ["bench.py", "--quick", "--methods", "linear", "--cache",
                                      str(tmp_path / "cache"), "--output", str(table_file)])
    start = time.perf_counter()
    assert bench.main() == 0
    elapsed = time.perf_counter() - start

    row = next(line for line in table_file.read_text().splitlines()
               if line.startswith("| linear |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    wall, cpu, rss, read_mb, written_mb, floor = (float(c) for c in cells[1:7])
    (out,) = kept
    out_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert cells[5] == f"{out_bytes / 1e6:.3g}"
    assert 0 < wall < elapsed and 0 < cpu < elapsed * (os.cpu_count() or 1)
    assert 10 < rss < 2000 and read_mb > 0 and 0 <= floor < elapsed

    models = [tmp_path / "cache" / "quick" / name for name in "abc"]
    inputs = [load_state(m) for m in models]
    merged = load_state(out)
    assert merged.keys() == inputs[0].keys()
    weights = torch.tensor([0.4, 0.3, 0.3])  # bench.recipes' linear
    for name, tensor in merged.items():
        acc = torch.zeros_like(inputs[0][name], dtype=torch.float32)
        for w, state in zip(weights, inputs):
            acc = acc + state[name].float() * w
        expected = (acc / weights.sum()).to(torch.bfloat16)
        assert torch.equal(tensor.view(torch.int16), expected.view(torch.int16)), name


def test_wall_ratio_is_the_median_of_each_rounds_ratio():
    """Each round's ratio, then their median: with ours 2, 3, 9 s and the other's 4, 6, 3 s
    the ratios are 0.5, 0.5 and 3, so 0.5 (the ratio of the medians would be 3 / 4)."""
    bench = _benchmarks_module("bench")

    def sample(wall: float, ok: bool = True):
        return bench.Sample(wall, 1.0, 100.0, 0.0, 1.0, ok)

    ours = [sample(2.0), sample(3.0), sample(9.0)]
    other = [sample(4.0), sample(3.0), sample(3.0)]
    assert bench.paired_ratio({"ours": ours, "other": other}) == 1.0
    other[1] = sample(6.0)  # ratios 0.5, 0.5, 3
    assert bench.paired_ratio({"ours": ours, "other": other}) == 0.5
    other[0] = sample(4.0, ok=False)  # a failed round counts for neither tool
    assert bench.paired_ratio({"ours": ours, "other": other}) == (0.5 + 3.0) / 2
    assert bench.paired_ratio({"ours": ours}) is None


def test_tools_run_free_to_cache_their_bytecode(monkeypatch):
    """A sandbox's PYTHONDONTWRITEBYTECODE must not reach the tools measured (an editable
    install would then compile its modules on every run), and they run offline."""
    bench = _benchmarks_module("bench")
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setenv("SOME_SETTING", "kept")
    env = bench.child_env()
    assert "PYTHONDONTWRITEBYTECODE" not in env
    assert env["SOME_SETTING"] == "kept" and env["HF_HUB_OFFLINE"] == "1"


def test_compare_outputs_counts_units_in_the_last_place(tmp_path):
    """Two folders whose tensors differ by k steps of the bit pattern (k neighbouring
    bfloat16 values): within rounding for k <= --ulps, not beyond; a missing tensor
    fails."""
    import torch
    from safetensors.torch import save_file

    compare = _benchmarks_module("compare_outputs")
    torch.manual_seed(0)
    state = {"w": torch.randn(8, 16).to(torch.bfloat16), "b": torch.randn(16).float()}
    (tmp_path / "a").mkdir()
    save_file(state, tmp_path / "a" / "model.safetensors")

    def variant(name: str, k: int, drop: bool = False) -> Path:
        w = state["w"].clone()
        w.view(torch.int16)[3, 5] += k  # k values further from zero (same sign)
        folder = tmp_path / name
        folder.mkdir()
        save_file({"w": w} if drop else {"w": w, "b": state["b"]},
                  folder / "model.safetensors")
        return folder

    assert compare.compare(tmp_path / "a", variant("same", 0), 0)[1]
    lines, ok = compare.compare(tmp_path / "a", variant("one", 1), 1)
    assert ok and "w: 1 of 128 elements differ, by at most 1 ulp" in lines
    assert not compare.compare(tmp_path / "a", variant("one again", 1), 0)[1]
    lines, ok = compare.compare(tmp_path / "a", variant("three", 3), 1)
    assert not ok and "by at most 3 ulp" in lines[-1]
    assert not compare.compare(tmp_path / "a", variant("missing", 0, drop=True), 1)[1]


def test_ulp_distance_across_zero_and_signs():
    import torch

    compare = _benchmarks_module("compare_outputs")
    tiny = torch.tensor([2.0**-146], dtype=torch.float32)  # 8 x the least subnormal: bits 8
    assert int(compare.ulp_distance(tiny, -tiny)) == 16
    assert int(compare.ulp_distance(torch.tensor([0.0]), torch.tensor([-0.0]))) == 0
    one = torch.tensor([1.0], dtype=torch.bfloat16)
    assert int(compare.ulp_distance(one, torch.tensor([1.0078125], dtype=torch.bfloat16))) == 1


def test_every_benchmark_recipe_is_a_valid_recipe(tmp_path):
    """The recipes --methods offers (most are not run by the quick test) parse, and each
    names a registered method."""
    from mergekit.config import parse_config
    from mergekit.methods.registry import all_methods

    bench = _benchmarks_module("bench")
    folders = [tmp_path / name for name in "abc"]
    for folder in folders:
        folder.mkdir()
    (tmp_path / "b_lora64").mkdir()  # the adapter the lora_input recipe reads
    recipes = bench.recipes(folders, 4)
    assert len(recipes) >= 13
    for name, recipe in recipes.items():
        config = parse_config(recipe)
        assert config.merge_method in all_methods(), name
