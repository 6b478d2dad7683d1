"""NaN or Inf in an input: a warning naming model and tensor; --strict-finite fails."""

import logging
import shutil

import pytest
import torch
from conftest import run_cli, write_recipe
from safetensors.torch import load_file, save_file

BAD = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def nan_model(llama_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("nan") / "with-nan"
    shutil.copytree(llama_models[1], folder)
    state = load_file(folder / "model.safetensors")
    state[BAD][0, 0] = float("nan")
    state[BAD][1, 2] = float("inf")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def recipe(tmp_path, a, b):
    return write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 0.5}},
        {"model": str(b), "parameters": {"weight": 0.5}}]})


def test_nan_input_warns_with_model_and_tensor(tmp_path, llama_models, nan_model):
    out = tmp_path / "out"
    proc = run_cli("mergekit.cli.yaml_cmd", recipe(tmp_path, llama_models[0], nan_model), out,
                   "-q")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "NaN or Inf" in line]
    assert len(warnings) == 1, proc.stderr
    assert str(nan_model) in warnings[0] and BAD in warnings[0]
    merged = load_file(out / "model.safetensors")
    assert torch.isnan(merged[BAD][0, 0]) and torch.isinf(merged[BAD][1, 2])


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_nan_input_warns_once_though_read_in_chunks(engine, llama_models, nan_model, merge,
                                                    small_chunks, monkeypatch):
    """NaN (row 0) and Inf (row 1) of one tensor, read in one-row chunks: two chunks are
    found not finite, on either engine, and the warning comes once."""
    import mergekit.finite as finite
    import mergekit.run as run

    if engine == "torch":
        monkeypatch.setattr(run, "NUMPY_ENGINE", False)
    small_chunks(16)  # BAD is (32, 16): one row per chunk
    found = []  # the row ranges of BAD seen not finite
    real_call = finite.FiniteCheck.__call__

    def call(self, model, name, rows, tensor):
        if name == BAD and not finite.all_finite(tensor):
            found.append(rows)
        real_call(self, model, name, rows, tensor)

    monkeypatch.setattr(finite.FiniteCheck, "__call__", call)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("mergekit")
    logger.addHandler(handler)
    try:
        out = merge({"merge_method": "linear", "models": [
            {"model": str(llama_models[0]), "parameters": {"weight": 0.5}},
            {"model": str(nan_model), "parameters": {"weight": 0.5}}]})
    finally:
        logger.removeHandler(handler)
    assert sorted(set(found)) == [(0, 1), (1, 2)]
    warnings = [r.getMessage() for r in records if "NaN or Inf" in r.getMessage()]
    assert len(warnings) == 1 and str(nan_model) in warnings[0] and BAD in warnings[0]
    merged = load_file(out / "model.safetensors")
    assert torch.isnan(merged[BAD][0, 0]) and torch.isinf(merged[BAD][1, 2])


@pytest.mark.parametrize("nan_is", ["base", "other"])
def test_nan_input_of_slerp_warns(tmp_path, llama_models, nan_model, nan_is):
    """slerp (like linear) checks its results and, where one is not finite, its inputs:
    the warning still names the input, base or not."""
    good = llama_models[0]
    base, other = (nan_model, good) if nan_is == "base" else (good, nan_model)
    recipe = write_recipe(tmp_path / "r.yml", {
        "merge_method": "slerp", "base_model": str(base), "parameters": {"t": 0.5},
        "models": [{"model": str(base)}, {"model": str(other)}]})
    proc = run_cli("mergekit.cli.yaml_cmd", recipe, tmp_path / "out", "-q")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "NaN or Inf" in line]
    assert len(warnings) == 1 and str(nan_model) in warnings[0] and BAD in warnings[0], \
        proc.stderr
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.isnan(merged[BAD][0, 0]) and torch.isfinite(merged[BAD][2:]).all()


def test_strict_finite_refuses(tmp_path, llama_models, nan_model):
    out = tmp_path / "out"
    proc = run_cli("mergekit.cli.yaml_cmd", recipe(tmp_path, llama_models[0], nan_model), out,
                   "-q", "--strict-finite", "--no-copy-tokenizer")
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"error: model {nan_model}: tensor {BAD} holds NaN or Inf")
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_finite_inputs_give_no_warning(tmp_path, llama_models):
    proc = run_cli("mergekit.cli.yaml_cmd", recipe(tmp_path, *llama_models[:2]),
                   tmp_path / "out", "-q", "--strict-finite")
    assert proc.returncode == 0, proc.stderr
    assert "NaN" not in proc.stderr


def test_nan_input_of_a_copied_tensor_warns(tmp_path, nan_model):
    """passthrough copies tensors without float32 math; the check still sees them."""
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(nan_model), "layer_range": [0, 4]}]}]})
    proc = run_cli("mergekit.cli.yaml_cmd", recipe, tmp_path / "out", "-q")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "NaN or Inf" in line]
    assert len(warnings) == 1 and BAD in warnings[0], proc.stderr
