"""arcee_fusion: take the model's changes whose importance (|delta| times the row's KL
divergence) reaches median + 1.5 IQR; keep the base elsewhere."""

from __future__ import annotations

import math

import numpy as np
import torch
from conftest import load_state

from mergekit.methods.registry import get_method


def run(base: list | np.ndarray, other: list | np.ndarray, seed: int = 0) -> np.ndarray:
    method = get_method("arcee_fusion")
    b = torch.as_tensor(np.asarray(base, dtype=np.float32))
    o = torch.as_tensor(np.asarray(other, dtype=np.float32))
    out = method.fn([o], b, method.make_params({"seed": seed}))
    assert out.dtype == torch.float32 and tuple(out.shape) == tuple(b.shape)
    return out.numpy()


def softmax(row: np.ndarray) -> np.ndarray:
    e = np.exp(row - row.max())
    return e / e.sum()


def fusion_mask(base: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Which entries the spec takes from the model."""
    a, b = np.asarray(base, np.float64), np.asarray(other, np.float64)
    rows_a, rows_b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    importance = np.empty(rows_a.shape)
    for i in range(rows_a.shape[0]):
        p = softmax(rows_b[i]) + 1e-8
        q = softmax(rows_a[i]) + 1e-8
        kl = float(np.sum(p * np.log(p / q)))
        importance[i] = np.abs(rows_b[i] - rows_a[i]) * kl
    ordered = np.sort(importance.ravel())
    n = ordered.size

    def quantile(q: float) -> float:
        return ordered[math.floor(q * (n - 1))]

    threshold = quantile(0.5) + 1.5 * (quantile(0.75) - quantile(0.25))
    return (importance >= threshold).reshape(a.shape)


def fusion_ref(base: np.ndarray, other: np.ndarray) -> np.ndarray:
    a, b = np.asarray(base, np.float32), np.asarray(other, np.float32)
    return np.where(fusion_mask(a, b), b, a)


def test_one_row_by_hand():
    # one row, base 0: importance = kl * |delta|, sorted kl * [1, 2, 3, 4, 5, 7, 8, 100]
    # n - 1 = 7: Q(.25) = [1] = 2, Q(.5) = [3] = 4, Q(.75) = [5] = 7 (times kl)
    # threshold = kl * (4 + 1.5 * 5) = 11.5 kl -> only the 100 is taken
    other = [[3.0, 1.0, 8.0, 2.0, 100.0, 4.0, 7.0, 5.0]]
    out = run(np.zeros((1, 8)), other)
    np.testing.assert_array_equal(out, [[0, 0, 0, 0, 100.0, 0, 0, 0]])


def test_a_row_whose_softmax_is_unchanged_is_not_important():
    # row 1 shifts every entry by 50: same softmax, kl 0, importance 0 however large the change
    # sorted importances: eight 0, then kl * [1, 2, 3, 4, 5, 7, 8, 100]; n - 1 = 15:
    # Q(.25) = [3] = 0, Q(.5) = [7] = 0, Q(.75) = [11] = 4 kl -> threshold 6 kl: 7, 8, 100
    other = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 8.0, 100.0], [50.0] * 8])
    out = run(np.zeros((2, 8)), other)
    expected = np.zeros((2, 8))
    expected[0, 5:] = [7.0, 8.0, 100.0]
    np.testing.assert_array_equal(out, expected)


def test_random_matches_reference():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(12, 10)).astype(np.float32)
    other = (base + rng.normal(size=base.shape) * rng.random((12, 1))).astype(np.float32)
    out = run(base, other)
    expected = fusion_ref(base, other)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    taken = ~np.isclose(expected, base, rtol=0, atol=0)
    assert 0 < taken.sum() < taken.size


def test_large_tensor_estimates_the_quantiles_from_a_seeded_sample():
    # above a million entries the quantiles come from a random sample: same seed, same bits;
    # and almost every entry decided as the exact quantiles would
    rng = np.random.default_rng(4)
    base = rng.normal(size=(1001, 1000)).astype(np.float32)
    other = (base + rng.normal(size=base.shape).astype(np.float32)).astype(np.float32)
    first = run(base, other, seed=1)
    assert first.tobytes() == run(base, other, seed=1).tobytes()
    taken = first != base
    exact = fusion_mask(base, other)
    assert (taken != exact).mean() < 1e-3


def test_merge_matches_reference(llama_models, merge):
    a, b, _ = llama_models
    out = merge({
        "merge_method": "arcee_fusion",
        "base_model": str(a),
        "models": [{"model": str(b)}],
    }, random_seed=5)
    A, B, M = load_state(a), load_state(b), load_state(out)
    for name in ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]:
        expected = fusion_ref(A[name].numpy(), B[name].numpy())
        np.testing.assert_allclose(M[name].numpy(), expected, rtol=0, atol=1e-6, err_msg=name)
