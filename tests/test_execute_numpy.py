"""CPU merges of the methods that take arrays (linear, slerp, passthrough, task_arithmetic,
karcher, multislerp, model_stock, nuslerp) run on numpy without torch: the same output bytes as
torch gives, for every stored and output float dtype, row chunks, cropped or padded
vocabularies, NaN and Inf; torch runs other methods, other dtypes and pickled inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_llama, load_state, write_recipe
from safetensors.torch import save_file

import mergekit.execute as execute_module
import mergekit.run as run


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny Llama models stored as bfloat16, float16 and float32; one with a larger
    vocabulary; one holding NaN and Inf; one that is twice another (colinear)."""
    root = tmp_path_factory.mktemp("numpy_engine")
    folders = {
        "bf16": build_llama(root / "bf16", 1, dtype=torch.bfloat16),
        "f16": build_llama(root / "f16", 2, dtype=torch.float16),
        "f32": build_llama(root / "f32", 3),
        "vocab80": build_llama(root / "vocab80", 4, vocab=80, dtype=torch.bfloat16),
        "nonfinite": build_llama(root / "nonfinite", 5, dtype=torch.bfloat16),
        "twice": build_llama(root / "twice", 1, dtype=torch.bfloat16),
    }
    state = load_state(folders["nonfinite"])
    name = "model.layers.1.mlp.up_proj.weight"
    state[name][3, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e38, -0.0])
    save_file(state, folders["nonfinite"] / "model.safetensors", metadata={"format": "pt"})
    state = {k: v * 2 for k, v in load_state(folders["bf16"]).items()}
    save_file(state, folders["twice"] / "model.safetensors", metadata={"format": "pt"})
    return folders


def _linear(*entries: tuple[Path, float], dtype: str = "bfloat16") -> dict:
    return {"merge_method": "linear", "dtype": dtype, "models": [
        {"model": str(m), "parameters": {"weight": w}} for m, w in entries]}


def _slerp(base: Path, other: Path, t: float, dtype: str = "bfloat16") -> dict:
    return {"merge_method": "slerp", "base_model": str(base), "dtype": dtype,
            "models": [{"model": str(base)}, {"model": str(other)}], "parameters": {"t": t}}


RECIPES = {
    "linear-bf16": lambda m: _linear((m["bf16"], 0.3), (m["f16"], 0.45), (m["f32"], 0.6)),
    "linear-f16": lambda m: _linear((m["bf16"], 0.3), (m["f16"], 0.45), (m["f32"], 0.6),
                                    dtype="float16"),
    "linear-f32": lambda m: _linear((m["bf16"], 0.7), (m["f32"], 0.2), dtype="float32"),
    "linear-unnormalized": lambda m: {**_linear((m["bf16"], 0.7), (m["f16"], 0.2)),
                                      "parameters": {"normalize": False}},
    "linear-vocab-crop": lambda m: _linear((m["vocab80"], 0.5), (m["bf16"], 0.5)),
    "linear-nonfinite": lambda m: _linear((m["nonfinite"], 0.5), (m["bf16"], 0.5)),
    "linear-nonfinite-f16": lambda m: _linear((m["nonfinite"], 0.5), (m["f32"], 0.5),
                                              dtype="float16"),
    "slerp-near": lambda m: _slerp(m["bf16"], m["f32"], 0.3),
    "slerp-far": lambda m: _slerp(m["f16"], m["bf16"], 0.8, dtype="float32"),
    "slerp-colinear-near": lambda m: _slerp(m["bf16"], m["twice"], 0.3),
    "slerp-colinear-far": lambda m: _slerp(m["bf16"], m["twice"], 0.7),
    "slerp-nonfinite": lambda m: _slerp(m["nonfinite"], m["bf16"], 0.4),
    "karcher": lambda m: {"merge_method": "karcher", "models": [
        {"model": str(m["bf16"]), "parameters": {"weight": 1.0}},
        {"model": str(m["f16"]), "parameters": {"weight": 2.0}},
        {"model": str(m["f32"]), "parameters": {"weight": 0.5}}]},
    "multislerp": lambda m: {"merge_method": "multislerp", "base_model": str(m["bf16"]),
                             "models": [{"model": str(m["f16"]), "parameters": {"weight": 0.7}},
                                        {"model": str(m["f32"]), "parameters": {"weight": 0.4}}]},
    "multislerp-no-base": lambda m: {"merge_method": "multislerp", "dtype": "float16",
                                     "models": [{"model": str(m[k])}
                                                for k in ("bf16", "f16", "f32")]},
    "task_arithmetic": lambda m: {
        "merge_method": "task_arithmetic", "base_model": str(m["bf16"]),
        "parameters": {"normalize": True, "lambda": 0.8}, "models": [
            {"model": str(m["f16"]), "parameters": {"weight": 0.3}},
            {"model": str(m["f32"]), "parameters": {"weight": 0.45}}]},
    "task_arithmetic-vocab": lambda m: {
        "merge_method": "task_arithmetic", "base_model": str(m["vocab80"]), "models": [
            {"model": str(m["f32"]), "parameters": {"weight": 0.6}},
            {"model": str(m["nonfinite"]), "parameters": {"weight": 0.2}}]},
    "model_stock": lambda m: {"merge_method": "model_stock", "base_model": str(m["bf16"]),
                              "models": [{"model": str(m["f16"])}, {"model": str(m["f32"])},
                                         {"model": str(m["nonfinite"])}]},
    "nuslerp": lambda m: {"merge_method": "nuslerp", "base_model": str(m["bf16"]), "models": [
        {"model": str(m["f16"]), "parameters": {"weight": 0.7}},
        {"model": str(m["f32"]), "parameters": {"weight": 0.4}}]},
    "nuslerp-no-base": lambda m: {"merge_method": "nuslerp", "models": [
        {"model": str(m["f16"]), "parameters": {"weight": 1.0}},
        {"model": str(m["nonfinite"]), "parameters": {"weight": 3.0}}]},
    "passthrough": lambda m: {"merge_method": "passthrough", "dtype": "float16", "slices": [
        {"sources": [{"model": str(m["bf16"]), "layer_range": [0, 2]}],
         "parameters": {"scale": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}},
        {"sources": [{"model": str(m["f32"]), "layer_range": [2, 4]}]}]},
    "passthrough-same-dtype": lambda m: {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(m["nonfinite"]), "layer_range": [0, 4]}]}]},
}


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _counting(monkeypatch: pytest.MonkeyPatch, name: str) -> list[str]:
    """Records the output tensor of every job that runs on backend ``name``."""
    seen: list[str] = []
    real = run.execute_job

    def counted(job, method, sources, backend, *args, **kwargs):
        if backend.name == name:
            seen.append(job.output_name)
        return real(job, method, sources, backend, *args, **kwargs)

    monkeypatch.setattr(run, "execute_job", counted)
    return seen


# Every recipe on whole tensors; in row chunks, one of each kind in the quick loop
# (-m "not slow") and every one in the full suite.
QUICK_CHUNKED = {"linear-bf16", "linear-nonfinite", "slerp-far", "model_stock", "passthrough"}
BYTES_CASES = [pytest.param(name, None, id=f"{name}-None") for name in sorted(RECIPES)] + [
    pytest.param(name, 40, id=f"{name}-40",
                 marks=() if name in QUICK_CHUNKED else pytest.mark.slow)
    for name in sorted(RECIPES)]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name, chunk_elements", BYTES_CASES)
def test_numpy_gives_the_bytes_of_torch(name, chunk_elements, models, merge, monkeypatch):
    recipe = RECIPES[name](models)
    if chunk_elements:  # several row chunks per tensor
        monkeypatch.setattr(execute_module, "CHUNK_ELEMENTS", chunk_elements)
    on_numpy = _counting(monkeypatch, "numpy")
    on_torch = _counting(monkeypatch, "torch")
    numpy_out = merge(recipe)
    assert on_numpy and not on_torch
    monkeypatch.setattr(run, "NUMPY_ENGINE", False)
    torch_out = merge(recipe)
    assert on_torch
    assert _bytes(numpy_out) == _bytes(torch_out)


def test_nonfinite_inputs_warn_on_numpy(models, merge, caplog):
    merge(RECIPES["linear-nonfinite"](models))
    assert "nonfinite: tensor model.layers.1.mlp.up_proj.weight holds NaN or Inf" in caplog.text


def test_nonfinite_inputs_fail_on_numpy_with_strict_finite(models, merge):
    from mergekit.errors import MergeError

    with pytest.raises(MergeError, match="up_proj.weight holds NaN or Inf"):
        merge(RECIPES["passthrough-same-dtype"](models), strict_finite=True)


def test_the_numpy_linear_result_is_the_float32_weighted_mean(models, merge):
    """Independent of both engines: the float32 weighted mean of the inputs' values,
    rounded to bfloat16 by torch."""
    out = load_state(merge(RECIPES["linear-bf16"](models)))
    inputs = [load_state(models[k]) for k in ("bf16", "f16", "f32")]
    weights = torch.tensor([0.3, 0.45, 0.6], dtype=torch.float32)
    for name, tensor in out.items():
        acc = torch.zeros_like(inputs[0][name], dtype=torch.float32)
        for w, state in zip(weights, inputs):
            acc = acc + state[name].float() * w
        expected = (acc / weights.sum()).to(torch.bfloat16)
        assert torch.equal(tensor.view(torch.int16), expected.view(torch.int16)), name


@pytest.mark.parametrize("case, engine", [
    ("linear", "numpy"), ("float64-input", "torch"), ("ties", "torch"), ("bin-input", "torch"),
    ("model_stock-filter-wise", "torch"), ("nuslerp-rows", "torch"),
])
def test_engine_choice(case, engine, models, merge, monkeypatch, tmp_path):
    recipe = RECIPES["linear-bf16"](models)
    if case == "float64-input":  # numpy widens float32, float16 and bfloat16 only
        folder = build_llama(tmp_path / "f64", 7, dtype=torch.float64)
        recipe = _linear((folder, 0.5), (models["bf16"], 0.5))
    elif case == "ties":
        recipe = {"merge_method": "ties", "base_model": str(models["bf16"]), "models": [
            {"model": str(models["f16"]), "parameters": {"weight": 0.5, "density": 0.5}}]}
    elif case == "model_stock-filter-wise":  # its per-row ratios are torch's
        recipe = {"merge_method": "model_stock", "base_model": str(models["bf16"]),
                  "parameters": {"filter_wise": True},
                  "models": [{"model": str(models["f16"])}, {"model": str(models["f32"])}]}
    elif case == "nuslerp-rows":  # rows and columns are torch's
        recipe = {"merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False},
                  "models": [{"model": str(models["f16"]), "parameters": {"weight": 1.0}},
                             {"model": str(models["f32"]), "parameters": {"weight": 2.0}}]}
    elif case == "bin-input":  # pickled checkpoints are read by torch
        folder = build_llama(tmp_path / "bin", 7, dtype=torch.bfloat16, safe=False)
        recipe = _linear((folder, 0.5), (models["bf16"], 0.5))
    on_numpy = _counting(monkeypatch, "numpy")
    on_torch = _counting(monkeypatch, "torch")
    merge(recipe)
    assert bool(on_numpy) == (engine == "numpy") and bool(on_torch) == (engine == "torch")


PROBE = r"""
import sys
from mergekit.cli.yaml_cmd import app
sys.argv = ["mergekit-yaml", *sys.argv[1:], "--quiet"]
try:
    app()
except SystemExit as exc:
    print(exc.code, "torch" in sys.modules)
"""


def test_a_small_linear_merge_never_imports_torch(models, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", RECIPES["linear-bf16"](models))
    out = subprocess.run([sys.executable, "-c", PROBE, str(recipe), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["0", "False"], out.stdout + out.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
