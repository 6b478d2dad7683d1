"""task_arithmetic: base + lambda * sum of weighted task vectors (optionally normalised)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_state, run_method
from pydantic import ValidationError

from mergekit.methods.registry import get_method


def run(tensors: list, base: list | np.ndarray, **params: object) -> np.ndarray:
    return run_method("task_arithmetic", tensors, base, **params)


def task_arithmetic_ref(xs: list[np.ndarray], base: np.ndarray, weights: list[float],
                        normalize: bool = False, lam: float = 1.0) -> np.ndarray:
    base = np.asarray(base, dtype=np.float64)
    mixed = sum(w * (np.asarray(x, dtype=np.float64) - base) for w, x in zip(weights, xs))
    if normalize:
        mixed = mixed / sum(weights)
    return base + lam * mixed


def test_by_hand():
    # deltas [1, 0, -1] and [-1, 2, 0]; weights 1, 0.5 -> mixed [0.5, 1, -1]; lambda 2
    out = run([[2.0, 2.0, 2.0], [0.0, 4.0, 3.0]], [1.0, 2.0, 3.0], weight=[1.0, 0.5],
              **{"lambda": 2.0})
    np.testing.assert_allclose(out, [2.0, 4.0, 1.0], rtol=0, atol=1e-6)


def test_normalize_by_hand():
    # mixed [0.5, 1, -1] / 1.5
    out = run([[2.0, 2.0, 2.0], [0.0, 4.0, 3.0]], [1.0, 2.0, 3.0], weight=[1.0, 0.5],
              normalize=True)
    np.testing.assert_allclose(out, [1.0 + 1 / 3, 2.0 + 2 / 3, 3.0 - 2 / 3], rtol=0,
                               atol=1e-6)


def test_defaults_do_not_normalize():
    # weights 2 and 2 on the same delta 1: unnormalised mixed is 4
    out = run([[1.0], [1.0]], [0.0], weight=[2.0, 2.0])
    np.testing.assert_allclose(out, [4.0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_random_matches_reference(normalize: bool):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(5, 7)).astype(np.float32)
    xs = [(base + rng.normal(size=base.shape)).astype(np.float32) for _ in range(3)]
    weights = [0.3, 1.2, -0.4]
    out = run(xs, base, weight=weights, normalize=normalize, **{"lambda": 0.7})
    expected = task_arithmetic_ref(xs, base, weights, normalize, 0.7)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_density_and_rescale_have_no_effect():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(4, 6)).astype(np.float32)
    xs = [(base + rng.normal(size=base.shape)).astype(np.float32) for _ in range(2)]
    plain = run(xs, base, weight=[1.0, 0.5])
    sparse = run(xs, base, weight=[1.0, 0.5], density=[0.2, 0.3], rescale=True)
    np.testing.assert_array_equal(plain, sparse)
    np.testing.assert_allclose(plain, task_arithmetic_ref(xs, base, [1.0, 0.5]), rtol=1e-5,
                               atol=1e-5)


def test_weight_is_required():
    with pytest.raises(ValidationError):
        get_method("task_arithmetic").make_params({"normalize": False})


def test_merge_matches_reference(llama_models, merge):
    a, b, c = llama_models
    out = merge({
        "merge_method": "task_arithmetic",
        "base_model": str(a),
        "models": [
            {"model": str(b), "parameters": {"weight": 0.7}},
            {"model": str(c), "parameters": {"weight": 0.5}},
        ],
        "parameters": {"lambda": 0.9},
    })
    A, B, C, M = load_state(a), load_state(b), load_state(c), load_state(out)
    for name in ["model.layers.1.self_attn.q_proj.weight", "lm_head.weight"]:
        expected = task_arithmetic_ref([B[name].numpy(), C[name].numpy()], A[name].numpy(),
                                       [0.7, 0.5], lam=0.9)
        np.testing.assert_allclose(M[name].numpy(), expected, rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    assert set(M) == set(A)
