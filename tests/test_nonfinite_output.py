"""A merged tensor holding NaN or Inf (after the cast to the output dtype) where its inputs
hold none fails the merge, naming the tensor and its parameters; --allow-nonfinite makes it
a warning. Inputs holding NaN or Inf keep their own warning and never trigger it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_state, run_cli, write_recipe
from hostile import assert_nothing_partial, tree_digest
from safetensors.torch import save_file

import mergekit.backends as backends
import mergekit.execute as execute_module
from mergekit.errors import MergeError

# a (16, 32) tensor: with 40-element chunks, one row per chunk
LATE = "model.layers.2.mlp.down_proj.weight"


def linear_recipe(models: list[Path], weights: list[float], dtype: str = "float16") -> dict:
    return {"merge_method": "linear", "dtype": dtype, "parameters": {"normalize": False},
            "models": [{"model": str(m), "parameters": {"weight": w}}
                       for m, w in zip(models, weights)]}


def expected_linear(models: list[Path], weights: list[float]) -> dict[str, np.ndarray]:
    """Each tensor's weighted sum as the engines compute it (float32 products, added in
    order), cast to float16."""
    states = [load_state(m) for m in models]
    out = {}
    with np.errstate(over="ignore", invalid="ignore"):
        for name in states[0]:
            total = states[0][name].float().numpy() * np.float32(weights[0])
            for state, w in zip(states[1:], weights[1:]):
                total = total + state[name].float().numpy() * np.float32(w)
            out[name] = total.astype(np.float16)
    return out


def nonfinite(expected: dict[str, np.ndarray]) -> dict[str, int]:
    return {k: int((~np.isfinite(v)).sum()) for k, v in expected.items()
            if not np.isfinite(v).all()}


def copy_model(src: Path, dest: Path, change=None, dtype: torch.dtype | None = None) -> Path:
    """A copy of a model folder; ``change(state)`` edits its tensors in place."""
    shutil.copytree(src, dest)
    state = load_state(dest)
    if change is not None:
        change(state)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def f64_models(llama_models, tmp_path_factory) -> list[Path]:
    """The first two test models stored as float64: the numpy engine cannot read them, so a
    linear merge of them runs on torch."""
    root = tmp_path_factory.mktemp("f64")
    return [copy_model(m, root / m.name, dtype=torch.float64) for m in llama_models[:2]]


# -- through the command line, on both engines ----------------------------------------------

WEIGHTS = [1e5, 1.0]
MESSAGE = ("the merged tensor holds {n} Inf values (float16 output; weight=[100000.0, 1.0], "
           "normalize=False) but its inputs do not")
FIX = ("lower the weights, set normalize: true, or use a wider dtype (float32/bfloat16); "
       "--allow-nonfinite writes it anyway")


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_float16_overflow_fails_naming_tensor_and_parameters(engine, llama_models, f64_models,
                                                             tmp_path):
    models = llama_models[:2] if engine == "numpy" else f64_models
    recipe = write_recipe(tmp_path / "r.yml", linear_recipe(models, WEIGHTS))
    overflows = nonfinite(expected_linear(models, WEIGHTS))
    assert overflows  # the norms' weights of 1.0 become 100001, past float16's 65504
    out = tmp_path / "out"
    watched = [tmp_path, *{m.parent for m in models}]
    before = [tree_digest(d, skip=[out]) for d in watched]
    proc = run_cli("mergekit.cli.yaml_cmd", recipe, out, "-q")
    assert proc.returncode == 1, proc.stderr
    # the tiny models have no tokenizer: that warning comes first
    lines = [line for line in proc.stderr.splitlines() if "no tokenizer" not in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    name = lines[0].removeprefix("error: ").split(":")[0]
    assert name in overflows, lines[0]
    assert lines[0] == f"error: {name}: {MESSAGE.format(n=overflows[name])}; {FIX}"
    assert [tree_digest(d, skip=[out]) for d in watched] == before
    assert_nothing_partial(out)


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_allow_nonfinite_writes_it_with_one_warning_per_tensor(engine, llama_models,
                                                              f64_models, tmp_path):
    models = llama_models[:2] if engine == "numpy" else f64_models
    recipe = write_recipe(tmp_path / "r.yml", linear_recipe(models, WEIGHTS))
    expected = expected_linear(models, WEIGHTS)
    out = tmp_path / "out"
    proc = run_cli("mergekit.cli.yaml_cmd", recipe, out, "-q", "--allow-nonfinite")
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "merged tensor holds" in line]
    assert sorted(warned) == sorted(
        f"WARNING: {k}: {MESSAGE.format(n=n)}; written anyway (--allow-nonfinite)"
        for k, n in nonfinite(expected).items())
    merged = load_state(out)
    for name, values in expected.items():
        assert merged[name].numpy().tobytes() == values.tobytes(), name


# -- row chunks, in process --------------------------------------------------------------------

ENGINES = ["numpy", "torch", "torch-overlapping"]


@pytest.fixture
def chunked(request, monkeypatch) -> dict[str, int]:
    """Forces one row per chunk for LATE (on the engine the test names) and records each
    tensor's chunk count."""
    import mergekit.run as run
    from mergekit.transfer import Transfer

    engine = request.param
    if engine != "numpy":
        monkeypatch.setattr(run, "NUMPY_ENGINE", False)
    if engine == "torch-overlapping":  # results collected a chunk late, as on CUDA

        class Overlapping(Transfer):
            def __init__(self, device):
                super().__init__(device)
                self.asynchronous = True

        monkeypatch.setattr(backends, "Transfer", Overlapping)
    counts: dict[str, int] = {}
    monkeypatch.setattr(execute_module, "CHUNK_ELEMENTS", 40)
    monkeypatch.setattr(backends.TorchBackend, "chunk_scale", 1)  # the same chunks on both
    real = execute_module.row_chunks

    def spy(job, *args):
        chunks = real(job, *args)
        counts[job.output_name] = len(chunks)
        return chunks

    monkeypatch.setattr(execute_module, "row_chunks", spy)
    return counts


def late_rows(state: dict[str, torch.Tensor]) -> None:
    """Values that overflow in the last row and in part of the fourth from last of LATE."""
    state[LATE][-1, :] = 10.0
    state[LATE][-4, :5] = -10.0


@pytest.fixture(scope="module")
def late_overflow(llama_models, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("late")
    return [copy_model(llama_models[0], root / "a", late_rows), llama_models[1]]


LATE_WEIGHTS = [1e4, 1.0]  # 1e4 * 10 > 65504; the other values stay below


@pytest.mark.parametrize("chunked", ENGINES, indirect=True)
def test_overflow_in_late_row_chunks_is_found_and_counted(chunked, late_overflow, merge,
                                                          caplog):
    recipe = linear_recipe(late_overflow, LATE_WEIGHTS)
    expected = expected_linear(late_overflow, LATE_WEIGHTS)
    assert nonfinite(expected) == {LATE: 32 + 5}
    with pytest.raises(MergeError) as err:
        merge(recipe)
    assert err.value.exit_code == 1
    assert str(err.value).startswith(f"{LATE}: the merged tensor holds 37 Inf values "
                                     "(float16 output; weight=[10000.0, 1.0], normalize=False)")
    assert chunked[LATE] == 16
    with caplog.at_level(logging.WARNING, logger="mergekit"):
        out = merge(recipe, allow_nonfinite=True)
    warned = [r.getMessage() for r in caplog.records if "merged tensor" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"{LATE}: the merged tensor holds 37 Inf")
    merged = load_state(out)
    for name, values in expected.items():
        assert merged[name].numpy().tobytes() == values.tobytes(), name


@pytest.fixture(scope="module")
def nan_and_late_overflow(llama_models, tmp_path_factory) -> list[Path]:
    """late_overflow, and a NaN in the first row of LATE in the second model."""
    def first_row_nan(state):
        state[LATE][0, 3] = float("nan")

    root = tmp_path_factory.mktemp("nan-late")
    return [copy_model(llama_models[0], root / "a", late_rows),
            copy_model(llama_models[1], root / "b", first_row_nan)]


@pytest.mark.parametrize("chunked", ENGINES, indirect=True)
def test_a_nan_input_anywhere_in_the_tensor_keeps_the_input_warning(
        chunked, nan_and_late_overflow, merge, caplog):
    """The input's warning only, though the NaN and the overflow are in different row
    chunks: the verdict is the whole tensor's, the same for any chunk size or engine."""
    recipe = linear_recipe(nan_and_late_overflow, LATE_WEIGHTS)
    with caplog.at_level(logging.WARNING, logger="mergekit"):
        out = merge(recipe)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "merged tensor holds" in m], messages
    assert [m for m in messages if "NaN or Inf" in m] == [
        f"model {nan_and_late_overflow[1]}: tensor {LATE} holds NaN or Inf values; the merged "
        "tensor may too (--strict-finite makes this an error)"]
    assert chunked[LATE] == 16
    merged = load_state(out)[LATE]
    assert torch.isnan(merged[0, 3]) and torch.isinf(merged[-1]).all()
    with pytest.raises(MergeError, match=f"model .*: tensor {LATE} holds NaN or Inf"):
        merge(recipe, strict_finite=True)


@pytest.fixture(scope="module")
def late_nan(llama_models, tmp_path_factory) -> list[Path]:
    def last_row_nan(state):
        state[LATE][-1, 0] = float("nan")

    root = tmp_path_factory.mktemp("late-nan")
    return [copy_model(llama_models[0], root / "a", last_row_nan), *llama_models[1:]]


@pytest.mark.parametrize("chunked", ENGINES, indirect=True)
def test_nan_spread_by_a_prepare_pass_is_the_inputs(chunked, late_nan, merge, caplog):
    """multislerp's prepare pass sums over the whole tensor: a NaN in the last row makes
    every row NaN, first row chunks included, whose own inputs are finite."""
    recipe = {"merge_method": "multislerp", "dtype": "float16",
              "models": [{"model": str(m)} for m in late_nan]}
    with caplog.at_level(logging.WARNING, logger="mergekit"):
        out = merge(recipe)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "merged tensor holds" in m], messages
    assert len([m for m in messages if "NaN or Inf" in m]) == 1, messages
    assert chunked[LATE] == 16
    assert torch.isnan(load_state(out)[LATE][0]).all()


def test_stored_finite_tells_every_16_bit_pattern():
    """The integer test of float16 and bfloat16 bytes agrees with their float32 values for
    every one of the 65536 bit patterns."""
    from mergekit.io.dtypes import numpy_dtype, to_float32

    for code in ("F16", "BF16"):
        bits = np.arange(1 << 16, dtype=np.uint16)
        finite = np.isfinite(to_float32(bits.view(numpy_dtype(code)), code))
        assert 0 < finite.sum() < len(bits)
        assert backends.stored_finite(bits[finite].view(numpy_dtype(code)), code)
        for bad in bits[~finite]:
            for at in (0, 1000, -1):  # among finite values: first, in the middle, last
                values = bits[finite][:2001].copy()
                values[at] = bad
                assert not backends.stored_finite(values.view(numpy_dtype(code)), code), \
                    (code, hex(bad))


@pytest.fixture(scope="module")
def big_value(llama_models, tmp_path_factory) -> Path:
    def one_big(state):
        state[LATE][-1, 0] = 1e5  # past float16's range

    return copy_model(llama_models[0], tmp_path_factory.mktemp("big") / "a", one_big)


@pytest.mark.parametrize("chunked", ENGINES[:2], indirect=True)
def test_a_copied_tensor_narrowed_past_its_range_fails(chunked, big_value, merge):
    """passthrough copies its input's bits when the dtype is kept, and narrows them when
    not: then they are checked too."""
    recipe = {"merge_method": "passthrough", "dtype": "float16",
              "slices": [{"sources": [{"model": str(big_value), "layer_range": [0, 4]}]}]}
    with pytest.raises(MergeError) as err:
        merge(recipe)
    assert str(err.value) == (
        f"{LATE}: the merged tensor holds 1 Inf values (float16 output; scale=[1.0]) but its "
        "inputs do not; use a wider dtype (float32/bfloat16); --allow-nonfinite writes it "
        "anyway")
    assert chunked[LATE] == 16
    merged = load_state(merge(recipe, allow_nonfinite=True))[LATE]
    assert torch.isinf(merged[-1, 0]) and torch.isfinite(merged.flatten()[:-32]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("chunk_elements", [None, 40], ids=["whole", "chunked"])
def test_overflow_on_cuda(chunk_elements, late_overflow, merge, monkeypatch):
    """On CUDA each chunk's sum comes back with the chunk, a step late: still found."""
    if chunk_elements:
        monkeypatch.setattr(execute_module, "CHUNK_ELEMENTS", chunk_elements)
    recipe = linear_recipe(late_overflow, LATE_WEIGHTS)
    with pytest.raises(MergeError, match=f"^{LATE}: the merged tensor holds 37 Inf values"):
        merge(recipe, cuda=True)
