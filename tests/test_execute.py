"""Executing tensor jobs: chunked execution gives the same bytes as whole-tensor execution;
the thread count of chunk passes."""

from pathlib import Path

import pytest
import torch
from conftest import load_state, run_method

import mergekit.backends as backends
import mergekit.execute as execute_module
import mergekit.finite as finite

RECIPES = {
    "arcee_fusion": lambda a, b, c: {"merge_method": "arcee_fusion", "base_model": a,
                                     "models": [{"model": b}]},
    "karcher": lambda a, b, c: {"merge_method": "karcher", "models": [
        {"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 2.0}},
        {"model": c, "parameters": {"weight": 0.5}}]},
    "linear": lambda a, b, c: {"merge_method": "linear", "models": [
        {"model": a, "parameters": {"weight": 0.3}}, {"model": b, "parameters": {"weight": 0.7}}]},
    "ties": lambda a, b, c: {"merge_method": "ties", "base_model": a, "models": [
        {"model": b, "parameters": {"weight": 0.5}}, {"model": c, "parameters": {"weight": 0.5}}]},
    "ties_sparse": lambda a, b, c: {"merge_method": "ties", "base_model": a,
                                    "parameters": {"rescale": True}, "models": [
        {"model": b, "parameters": {"weight": 0.5, "density": 0.3}},
        {"model": c, "parameters": {"weight": 0.7, "density": 0.6}}]},
    "passthrough": lambda a, b, c: {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}],
         "parameters": {"scale": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}}]},
    "slerp": lambda a, b, c: {"merge_method": "slerp", "base_model": a, "models": [
        {"model": a}, {"model": b}], "parameters": {"t": [0.1, 0.9]}},
    "dare_ties": lambda a, b, c: {"merge_method": "dare_ties", "base_model": a, "models": [
        {"model": b, "parameters": {"weight": 0.5, "density": 0.4}},
        {"model": c, "parameters": {"weight": 0.5, "density": 0.7}}]},
    "della_linear": lambda a, b, c: {"merge_method": "della_linear", "base_model": a,
                                     "models": [
        {"model": b, "parameters": {"weight": 0.5, "density": 0.4, "epsilon": 0.1}},
        {"model": c, "parameters": {"weight": 0.5, "density": 0.7}}]},
    "breadcrumbs_ties": lambda a, b, c: {"merge_method": "breadcrumbs_ties", "base_model": a,
                                         "models": [
        {"model": b, "parameters": {"weight": 0.5, "density": 0.5, "gamma": 0.1}},
        {"model": c, "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}}]},
    "breadcrumbs_rescaled": lambda a, b, c: {"merge_method": "breadcrumbs", "base_model": a,
                                             "parameters": {"rescale": True}, "models": [
        {"model": b, "parameters": {"weight": 0.6, "density": 0.3, "gamma": 0.2}},
        {"model": c, "parameters": {"weight": 0.4, "density": 1.0}}]},
    "model_stock": lambda a, b, c: {"merge_method": "model_stock", "base_model": a,
                                    "models": [{"model": b}, {"model": c}]},
    "model_stock_rows": lambda a, b, c: {"merge_method": "model_stock", "base_model": a,
                                         "parameters": {"filter_wise": True},
                                         "models": [{"model": b}, {"model": c}]},
    "multislerp": lambda a, b, c: {"merge_method": "multislerp", "base_model": a, "models": [
        {"model": b, "parameters": {"weight": 0.7}}, {"model": c, "parameters": {"weight": 0.4}}]},
    "multislerp_no_base": lambda a, b, c: {"merge_method": "multislerp", "models": [
        {"model": a}, {"model": b}, {"model": c}]},
    "nuslerp": lambda a, b, c: {"merge_method": "nuslerp", "base_model": a, "models": [
        {"model": b, "parameters": {"weight": 0.7}}, {"model": c, "parameters": {"weight": 0.4}}]},
    "nuslerp_columns": lambda a, b, c: {"merge_method": "nuslerp", "base_model": a,
                                        "parameters": {"nuslerp_flatten": False,
                                                       "nuslerp_row_wise": True}, "models": [
        {"model": b, "parameters": {"weight": 1.0}}, {"model": c, "parameters": {"weight": 3.0}}]},
    "nuslerp_rows": lambda a, b, c: {"merge_method": "nuslerp", "parameters": {
        "nuslerp_flatten": False}, "models": [
        {"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 2.0}}]},
    "ramplus_tl": lambda a, b, c: {"merge_method": "ramplus_tl", "base_model": a,
                                   "parameters": {"epsilon": 0.05, "r": 0.5, "alpha": 0.9},
                                   "models": [{"model": b}, {"model": c}]},
    "sce": lambda a, b, c: {"merge_method": "sce", "base_model": a,
                            "parameters": {"select_topk": 0.4},
                            "models": [{"model": b}, {"model": c}]},
    "task_arithmetic": lambda a, b, c: {"merge_method": "task_arithmetic", "base_model": a,
                                        "dtype": "bfloat16", "models": [
        {"model": b, "parameters": {"weight": 0.5}}, {"model": c, "parameters": {"weight": 0.2}}]},
}


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _takes_arrays(name: str) -> bool:
    from mergekit.methods.registry import get_method

    recipe = RECIPES[name]("a", "b", "c")
    method = get_method(recipe["merge_method"])
    # the recipe's global parameters decide (model_stock takes arrays unless filter-wise)
    params = method.params_model.model_construct(**recipe.get("parameters", {}))
    return method.takes_arrays(params)


# every recipe on torch; those of methods that take arrays on numpy too
ENGINE_CASES = [(name, "torch") for name in sorted(RECIPES)] + [
    (name, "numpy") for name in sorted(RECIPES) if _takes_arrays(name)]


def _has_prepare(name: str) -> bool:
    from mergekit.methods.registry import get_method

    return get_method(RECIPES[name]("a", "b", "c")["merge_method"]).prepare is not None


# One recipe of each kind runs in the quick loop (-m "not slow"): no prepare pass, a
# whole-tensor prepare pass, positional random draws, row-wise, copied bits; every recipe
# runs in the full suite.
QUICK_CHUNK_RECIPES = {"linear", "ties_sparse", "dare_ties", "nuslerp_rows", "passthrough"}

# a backend keeps a tensor's inputs between a prepare pass and the merge pass when they fit
# in its prepare_cache_bytes ("cached"), else reads them again ("reread")
CHUNK_CASES = [
    pytest.param(name, engine, cache, id=f"{name}-{engine}-{cache}",
                 marks=() if name in QUICK_CHUNK_RECIPES else pytest.mark.slow)
    for name, engine in ENGINE_CASES
    for cache in (("cached", "reread") if _has_prepare(name) else ("cached",))]


@pytest.mark.parametrize("name, engine, cache", CHUNK_CASES)
def test_row_chunks_give_identical_bytes(name, engine, cache, llama_models, merge,
                                         monkeypatch):
    import mergekit.run as run

    if engine == "torch":
        monkeypatch.setattr(run, "NUMPY_ENGINE", False)
    recipe = RECIPES[name](*(str(m) for m in llama_models))
    whole = merge(recipe)
    monkeypatch.setattr(execute_module, "CHUNK_ELEMENTS", 100)  # several chunks per tensor
    for backend in (backends.NumpyBackend, backends.TorchBackend):
        monkeypatch.setattr(backend, "prepare_cache_bytes",
                            256 * 1024**2 if cache == "cached" else 0)
    calls = []
    real = execute_module.row_chunks
    monkeypatch.setattr(execute_module, "row_chunks",
                        lambda *a: calls.append(r := real(*a)) or r)
    chunked = merge(recipe)
    assert any(len(c) > 1 for c in calls), "no tensor was split into chunks"
    assert _bytes(whole) == _bytes(chunked)
    assert load_state(whole).keys() == load_state(chunked).keys()


def test_arcee_fusion_samples_positions_over_the_whole_tensor(llama_models, merge, monkeypatch):
    """Above QUANTILE_SAMPLE entries the quantiles come from a seeded sample of positions;
    drawn over the whole tensor and gathered from its chunks, it is the same sample."""
    from mergekit.methods import arcee_fusion

    monkeypatch.setattr(arcee_fusion, "QUANTILE_SAMPLE", 100)
    recipe = RECIPES["arcee_fusion"](*(str(m) for m in llama_models))
    whole = merge(recipe, random_seed=3)
    other_seed = merge(recipe, random_seed=4)
    monkeypatch.setattr(execute_module, "CHUNK_ELEMENTS", 40)
    chunked = merge(recipe, random_seed=3)
    assert _bytes(whole) == _bytes(chunked)
    assert _bytes(whole) != _bytes(other_seed)  # the sample decides: the test can fail


@pytest.mark.parametrize("name, prepare_threads", [("slerp", 2), ("ties", 3), ("dare_ties", 3)])
def test_chunk_passes_leave_one_core_to_the_output_threads(name, prepare_threads, llama_models,
                                                           merge, monkeypatch, on_torch):
    """Row-chunk passes run on one thread fewer than torch had, and so do the prepare
    passes over row chunks of methods whose prepare is light (slerp); whole tensors and
    other prepare passes use them all; the count is given back at the end."""
    import dataclasses

    import torch

    from mergekit.methods import registry

    real = registry.get_method(name)
    seen: dict[str, set[int]] = {"prepare": set(), "chunk": set(), "whole": set()}

    def prepare(chunks, params):
        seen["prepare"].add(torch.get_num_threads())
        return real.prepare(chunks, params)

    def fn(tensors, base, params):
        # with 40-element chunks every 2-D tensor is split; 1-D ones stay whole
        seen["chunk" if tensors[0].dim() > 1 else "whole"].add(torch.get_num_threads())
        return real.fn(tensors, base, params)

    monkeypatch.setitem(registry._METHODS, name,
                        dataclasses.replace(real, fn=fn, prepare=prepare))
    monkeypatch.setattr(execute_module, "CHUNK_ELEMENTS", 40)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        merge(RECIPES[name](*(str(m) for m in llama_models)))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    # 1-D tensors (norms) are prepared whole, on every thread
    assert seen == {"prepare": {prepare_threads, 3}, "chunk": {2}, "whole": {3}}


STORED = {"bf16": torch.bfloat16, "f16": torch.float16, "f64": torch.float64,
          "f8": torch.float8_e4m3fn}


@pytest.fixture(scope="module")
def stored_models(tmp_path_factory, llama_models) -> dict[str, Path]:
    """Copies of a test model stored in each of the float dtypes of STORED."""
    import shutil

    from safetensors.torch import save_file

    folders = {}
    for code, dtype in STORED.items():
        folder = tmp_path_factory.mktemp("stored") / code
        shutil.copytree(llama_models[0 if code in ("bf16", "f64") else 1], folder)
        state = {k: v.to(dtype) for k, v in load_state(folder).items()}
        (folder / "model.safetensors").unlink()
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        folders[code] = folder
    return folders


@pytest.mark.parametrize("chunk_elements", [None, 40])
@pytest.mark.parametrize("pair", [("bf16", "f16"), ("f64", "f8")])
def test_inputs_of_any_stored_dtype_merge_as_their_float32_values(stored_models, merge,
                                                                  monkeypatch, chunk_elements,
                                                                  pair):
    """Inputs stored as bfloat16, float16, float64 or float8 give the output bits of the
    method run on their float32 values and cast to the output dtype."""
    from mergekit.methods.registry import get_method

    if chunk_elements:
        monkeypatch.setattr(execute_module, "CHUNK_ELEMENTS", chunk_elements)
    models = [stored_models[code] for code in pair]
    out = merge({"merge_method": "linear", "dtype": "bfloat16", "models": [
        {"model": str(models[0]), "parameters": {"weight": 0.3}},
        {"model": str(models[1]), "parameters": {"weight": 0.6}}]})
    merged = load_state(out)
    a, b = (load_state(m) for m in models)
    linear = get_method("linear")
    params = linear.make_params({"weight": (0.3, 0.6)})
    for name, tensor in merged.items():
        expected = linear.fn([a[name].float(), b[name].float()], None, params)
        assert torch.equal(tensor.view(torch.int16), expected.to(torch.bfloat16).view(
            torch.int16)), name


@pytest.mark.parametrize("name", ["linear", "ties"])
def test_results_collected_a_chunk_late_keep_their_order(name, llama_models, merge,
                                                          monkeypatch):
    """With a device whose copies to the host are asynchronous (CUDA), each chunk's result
    is collected after the next chunk's work is queued, and the last one after the loop:
    forced on here (the CPU has nothing to overlap), the output keeps its bytes."""
    from mergekit.transfer import Transfer

    class Overlapping(Transfer):
        def __init__(self, device):
            super().__init__(device)
            self.asynchronous = True

    recipe = RECIPES[name](*(str(m) for m in llama_models))
    monkeypatch.setattr(execute_module, "CHUNK_ELEMENTS", 40)
    in_order = merge(recipe)
    monkeypatch.setattr(backends, "Transfer", Overlapping)
    assert _bytes(merge(recipe)) == _bytes(in_order)


def test_finite_check_remembers_one_job_at_a_time(llama_models, merge, monkeypatch):
    """The NaN/Inf check sums each input chunk once per job, though a prepare pass reads it
    again, and forgets the chunks of finished jobs: its memory does not grow with the
    model."""
    from collections import Counter

    monkeypatch.setattr(execute_module, "CHUNK_ELEMENTS", 40)
    monkeypatch.setattr(backends.TorchBackend, "prepare_cache_bytes", 0)  # passes read again
    sums: Counter = Counter()
    remembered: list[int] = []
    real_all_finite, real_call = finite.all_finite, finite.FiniteCheck.__call__

    checking: list[tuple] = []  # the chunk being checked

    def counting_all_finite(tensor):
        sums.update(checking)
        return real_all_finite(tensor)

    def call(self, model, name, rows, tensor):
        checking[:] = [(model, name, rows)]
        real_call(self, model, name, rows, tensor)
        checking.clear()
        remembered.append(len(self._seen))

    monkeypatch.setattr(finite, "all_finite", counting_all_finite)
    monkeypatch.setattr(finite.FiniteCheck, "__call__", call)
    merge(RECIPES["ties"](*(str(m) for m in llama_models)))
    assert sums and set(sums.values()) == {1}  # once per chunk, though read twice
    per_tensor = Counter(name for _, name, _ in sums)
    assert max(remembered) == max(per_tensor.values()) < len(sums)


@pytest.fixture(scope="module")
def models_with_empty_tensors(tmp_path_factory, llama_models) -> list[Path]:
    """Copies of the test models with two extra empty tensors, (0, 16) and (3, 0)."""
    import shutil

    from safetensors.torch import save_file

    folders = []
    for model in llama_models:
        folder = tmp_path_factory.mktemp("empty") / model.name
        shutil.copytree(model, folder)
        state = load_state(folder)
        state["model.layers.0.mlp.no_rows"] = torch.zeros(0, 16)
        state["model.layers.0.mlp.no_columns"] = torch.zeros(3, 0)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        folders.append(folder)
    return folders


@pytest.mark.parametrize("name, engine", ENGINE_CASES)
def test_empty_tensors_merge_to_empty_tensors(name, engine, models_with_empty_tensors, merge,
                                              monkeypatch):
    """Every method, on both engines: an empty tensor comes out empty, of its shape (its
    selection, ranks and divergences are never asked of nothing)."""
    import mergekit.run as run

    if engine == "torch":
        monkeypatch.setattr(run, "NUMPY_ENGINE", False)
    recipe = RECIPES[name](*(str(m) for m in models_with_empty_tensors))
    state = load_state(merge(recipe, random_seed=3))
    if name == "passthrough":  # its slice holds layers 0-1 of the first model
        assert "model.layers.0.mlp.no_rows" in state
    for tensor_name, shape in (("model.layers.0.mlp.no_rows", (0, 16)),
                               ("model.layers.0.mlp.no_columns", (3, 0))):
        assert tuple(state[tensor_name].shape) == shape, tensor_name


@pytest.fixture(scope="module")
def models_with_random_norms(tmp_path_factory, llama_models) -> list[Path]:
    """Copies of the test models whose norm weights (1-D, 16 entries; all ones as built)
    are random."""
    import shutil

    from safetensors.torch import save_file

    folders = []
    generator = torch.Generator().manual_seed(0)
    for model in llama_models:
        folder = tmp_path_factory.mktemp("norms") / model.name
        shutil.copytree(model, folder)
        state = {name: torch.randn(t.shape, generator=generator) if t.dim() == 1 else t
                 for name, t in load_state(folder).items()}
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        folders.append(folder)
    return folders


def test_one_dimensional_tensors_stay_whole(models_with_random_norms, merge, small_chunks):
    """A 1-D tensor larger than a chunk is one row for row-wise methods: della ranks the
    magnitudes of all 16 entries of a norm weight, not of 4-entry pieces."""
    from mergekit.plan import tensor_seed

    paths = models_with_random_norms
    a, b, c = (load_state(m) for m in paths)
    recipe = {"merge_method": "della", "base_model": str(paths[0]), "models": [
        {"model": str(paths[1]), "parameters": {"weight": 0.5, "density": 0.4}},
        {"model": str(paths[2]), "parameters": {"weight": 0.7, "density": 0.6}}]}
    small_chunks(4)
    merged = load_state(merge(recipe))
    norms = [name for name, t in merged.items() if t.dim() == 1]
    assert len(norms) == 9 and all(merged[name].numel() == 16 for name in norms)
    for name in norms:
        expected = run_method("della", [b[name], c[name]], a[name], weight=[0.5, 0.7],
                              density=[0.4, 0.6], epsilon=[0.15, 0.15],
                              seed=tensor_seed(None, name), numel=16)
        assert torch.equal(merged[name], torch.from_numpy(expected)), name
