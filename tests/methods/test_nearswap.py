"""nearswap: take the other model's value where it is close to the base's, interpolating by
t / |base - other| elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_state

from mergekit.methods.registry import get_method


def run(base: list | np.ndarray, other: list | np.ndarray, t: float) -> np.ndarray:
    method = get_method("nearswap")
    b = torch.as_tensor(np.asarray(base, dtype=np.float32))
    o = torch.as_tensor(np.asarray(other, dtype=np.float32))
    out = method.fn([o], b, method.make_params({"t": t}))
    assert out.dtype == torch.float32 and tuple(out.shape) == tuple(b.shape)
    return out.numpy()


def nearswap_ref(base: np.ndarray, other: np.ndarray, t: float) -> np.ndarray:
    a, b = np.asarray(base, np.float64), np.asarray(other, np.float64)
    out = np.empty(a.shape)
    for j in range(a.size):
        distance = abs(a.flat[j] - b.flat[j])
        weight = 1.0 if distance == 0 else min(max(t / distance, 0.0), 1.0)
        out.flat[j] = weight * b.flat[j] + (1 - weight) * a.flat[j]
    return out


def test_by_hand():
    # distances [0.1, 1, 0, 4] -> weights [1 (0.5/0.1 clamped), 0.5, 1, 0.125]
    out = run([0.0, 0.0, 1.0, 2.0], [0.1, 1.0, 1.0, -2.0], 0.5)
    np.testing.assert_allclose(out, [0.1, 0.5, 1.0, 2.0 * 0.875 - 2.0 * 0.125], rtol=0,
                               atol=1e-6)


def test_t_zero_keeps_the_base():
    rng = np.random.default_rng(0)
    base, other = rng.normal(size=(2, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(run(base, other, 0.0), base)


def test_large_t_takes_the_other_model():
    rng = np.random.default_rng(1)
    base, other = rng.normal(size=(2, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(run(base, other, 1e6), other, rtol=0, atol=1e-6)


@pytest.mark.parametrize("t", [0.05, 0.5, 2.0])
def test_random_matches_reference(t: float):
    rng = np.random.default_rng(2)
    base, other = rng.normal(size=(2, 6, 7)).astype(np.float32)
    other[0, :3] = base[0, :3]  # equal entries
    np.testing.assert_allclose(run(base, other, t), nearswap_ref(base, other, t), rtol=1e-6,
                               atol=1e-6)


def test_merge_matches_reference(llama_models, merge):
    a, b, _ = llama_models
    out = merge({
        "merge_method": "nearswap",
        "base_model": str(a),
        "models": [{"model": str(b)}],
        "parameters": {"t": 0.01},
    })
    A, B, M = load_state(a), load_state(b), load_state(out)
    for name in ["model.layers.3.mlp.up_proj.weight", "model.embed_tokens.weight"]:
        expected = nearswap_ref(A[name].numpy(), B[name].numpy(), 0.01)
        np.testing.assert_allclose(M[name].numpy(), expected, rtol=1e-5, atol=1e-6,
                                   err_msg=name)
