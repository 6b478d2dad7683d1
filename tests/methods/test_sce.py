"""sce: select the positions where the task vectors vary most, weight each model by its
task vector's energy, erase the entries that disagree with the elected sign."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_state
from pydantic import ValidationError

from mergekit.methods.registry import get_method


def run(tensors: list, base: list | np.ndarray, **params: object) -> np.ndarray:
    method = get_method("sce")
    b = torch.as_tensor(np.asarray(base, dtype=np.float32))
    xs = [torch.as_tensor(np.asarray(x, dtype=np.float32)) for x in tensors]
    out = method.fn(xs, b, method.make_params(params))
    assert out.dtype == torch.float32 and tuple(out.shape) == tuple(b.shape)
    return out.numpy()


def sce_ref(xs: list[np.ndarray], base: np.ndarray, select_topk: float = 1.0) -> np.ndarray:
    base32 = np.asarray(base, np.float32)
    deltas = [(np.asarray(x, np.float32) - base32).astype(np.float64).ravel() for x in xs]
    n, size = len(deltas), deltas[0].size
    if select_topk < 1.0:
        variance = [np.mean([(d[j] - np.mean([e[j] for e in deltas])) ** 2 for d in deltas])
                    for j in range(size)]
        k = int(select_topk * sum(1 for v in variance if v != 0))
        top = set(sorted(range(size), key=lambda j: -variance[j])[:k])
        deltas = [np.array([d[j] if j in top else 0.0 for j in range(size)]) for d in deltas]
    energy = [float(np.mean(d ** 2)) for d in deltas]
    total = sum(energy)
    weights = [1.0 / n] * n if total < 1e-6 else [e / total for e in energy]
    out = np.empty(size)
    for j in range(size):
        elected = 1.0 if sum(d[j] for d in deltas) >= 0 else -1.0
        agree = [np.sign(d[j]) == elected for d in deltas]
        mixed = sum(w * d[j] for w, d, a in zip(weights, deltas, agree) if a)
        divisor = sum(w for w, a in zip(weights, agree) if a)
        out[j] = mixed / max(divisor, 1e-6)
    return base32.astype(np.float64) + out.reshape(base32.shape)


def test_by_hand():
    # deltas d1 = [1, -2, 0, 3], d2 = [1, 2, 0, -1] over a zero base
    # energies 14/4 and 6/4 -> weights 0.7, 0.3; sums [2, 0, 0, 2] elect + everywhere
    # agreeing: [both, d2, none, d1] -> [1, 0.3*2/0.3, 0, 0.7*3/0.7]
    out = run([[1.0, -2.0, 0.0, 3.0], [1.0, 2.0, 0.0, -1.0]], [0.0] * 4)
    np.testing.assert_allclose(out, [1.0, 2.0, 0.0, 3.0], rtol=0, atol=1e-6)


def test_energy_weights_by_hand():
    # d1 = [1, 1], d2 = [3, 3]: energies 1 and 9 -> weights 0.1, 0.9 -> 0.1 + 2.7 = 2.8
    out = run([[1.0, 1.0], [3.0, 3.0]], [0.0, 0.0])
    np.testing.assert_allclose(out, [2.8, 2.8], rtol=1e-6)


def test_tiny_task_vectors_get_uniform_weights():
    # energies 1e-8 and 9e-8 sum below 1e-6: weights 1/2 each -> (1e-4 + 3e-4) / 2
    out = run([[1e-4, 1e-4], [3e-4, 3e-4]], [0.0, 0.0])
    np.testing.assert_allclose(out, [2e-4, 2e-4], rtol=1e-5)


def test_select_topk_by_hand():
    # per-position variances of d1 = [0, 1, 4, 2], d2 = [0, -1, 0, 2]: [0, 1, 4, 0]
    # 2 nonzero -> topk 0.5 keeps 1 position (index 2): deltas [0, 0, 4, 0] and 0s
    # weights (16/4) / (16/4) = 1 and 0: result [0, 0, 4, 0]
    out = run([[0.0, 1.0, 4.0, 2.0], [0.0, -1.0, 0.0, 2.0]], [0.0] * 4, select_topk=0.5)
    np.testing.assert_allclose(out, [0.0, 0.0, 4.0, 0.0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1])
def test_random_matches_reference(select_topk: float):
    rng = np.random.default_rng(5)
    base = rng.normal(size=(6, 7)).astype(np.float32)
    xs = [(base + rng.normal(size=base.shape) * s).astype(np.float32) for s in (0.5, 1.0, 2.0)]
    out = run(xs, base, select_topk=select_topk)
    np.testing.assert_allclose(out, sce_ref(xs, base, select_topk), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5])
def test_select_topk_outside_range_is_rejected(value: float):
    with pytest.raises(ValidationError):
        get_method("sce").make_params({"select_topk": value})


def test_merge_matches_reference(llama_models, merge):
    a, b, c = llama_models
    out = merge({
        "merge_method": "sce",
        "base_model": str(a),
        "models": [{"model": str(b)}, {"model": str(c)}],
        "parameters": {"select_topk": 0.5},
    })
    A, B, C, M = load_state(a), load_state(b), load_state(c), load_state(out)
    for name in ["model.layers.2.self_attn.q_proj.weight", "model.embed_tokens.weight"]:
        expected = sce_ref([B[name].numpy(), C[name].numpy()], A[name].numpy(), 0.5)
        np.testing.assert_allclose(M[name].numpy(), expected, rtol=1e-5, atol=1e-6,
                                   err_msg=name)


@pytest.mark.parametrize("rows_per_chunk", [1, 4, 9, 30])
def test_row_chunks_select_what_the_whole_tensor_selects(rows_per_chunk: int):
    """The prepare pass finds the selection's edge and, per row chunk, how many positions
    of equal variance come before it: chunks merged one by one give the whole tensor's
    bits, here with many positions of equal variance, which rank in index order."""
    from mergekit.methods.sce import prepare_sce

    method = get_method("sce")
    rng = np.random.default_rng(5)
    base = torch.from_numpy((rng.integers(-2, 3, size=(30, 12)) / 4).astype(np.float32))
    xs = [base + torch.from_numpy((rng.integers(-2, 3, size=(30, 12)) / 2).astype(np.float32))
          for _ in range(3)]
    params = method.make_params({"select_topk": 0.3})
    whole = method.fn(xs, base, params)
    chunks = [([x[r:r + rows_per_chunk] for x in xs], base[r:r + rows_per_chunk], r * 12)
              for r in range(0, 30, rows_per_chunk)]
    prepared = prepare_sce(lambda: chunks, params)
    parts = [method.fn(c_xs, c_base, prepared.model_copy(update={"offset": offset}))
             for c_xs, c_base, offset in chunks]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)
    expected = sce_ref([x.numpy() for x in xs], base.numpy(), 0.3)
    np.testing.assert_allclose(whole.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_select_topk_of_too_few_nonzero_positions_keeps_none():
    # variances [0, 1, 0, 0]: 1 nonzero -> topk 0.5 keeps int(0.5) = 0 positions: the base
    out = run([[0.0, 1.0, 0.0, 2.0], [0.0, -1.0, 0.0, 2.0]], [0.5] * 4, select_topk=0.5)
    np.testing.assert_array_equal(out, [0.5] * 4)
