"""ram / ramplus_tl: task-vector entries only one model changes are added as they are,
entries several models change are averaged over those models (RAM+ boosts the unique ones)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_state

from mergekit.methods.registry import get_method

# deltas over a zero base: entry 0 shared, entry 1 untouched, entry 2 unique to model 1,
# entry 3 below epsilon in model 2 (inactive)
D1 = [1.0, 0.0, 2.0, 0.0]
D2 = [3.0, 0.0, 0.0, 1e-6]


def run(name: str, tensors: list, base: list | np.ndarray, **params: object) -> np.ndarray:
    method = get_method(name)
    b = torch.as_tensor(np.asarray(base, dtype=np.float32))
    xs = [torch.as_tensor(np.asarray(x, dtype=np.float32)) for x in tensors]
    out = method.fn(xs, b, method.make_params(params))
    assert out.dtype == torch.float32 and tuple(out.shape) == tuple(b.shape)
    return out.numpy()


def ram_ref(xs: list[np.ndarray], base: np.ndarray, epsilon: float = 1e-5, plus: bool = False,
            r: float = 0.1, alpha: float = 0.2) -> np.ndarray:
    base32 = np.asarray(base, np.float32)
    deltas = [(np.asarray(x, np.float32) - base32).astype(np.float64).ravel() for x in xs]
    active = [np.abs(d) > epsilon for d in deltas]
    count = sum(a.astype(int) for a in active)
    out = np.zeros(base32.size)
    if not plus:
        for j in range(base32.size):
            out[j] = sum(d[j] for d, a in zip(deltas, active) if a[j]) / max(count[j], 1)
    else:
        for d, a in zip(deltas, active):
            shared = a & (count > 1)
            unique = a & (count == 1)
            ratio = shared.sum() / unique.sum() if unique.sum() > 0 else 0.0
            boost = 1.0 + r * min(max(ratio, 0.0), alpha)
            out += boost * d * unique
            out += np.where(count > 1, d * shared / np.maximum(count, 1), 0.0)
    return base32.astype(np.float64) + out.reshape(base32.shape)


def test_ram_by_hand():
    # entry 0: (1 + 3) / 2; entry 2: 2 alone; entry 3: 1e-6 is inactive -> 0
    out = run("ram", [D1, D2], [0.0] * 4)
    np.testing.assert_array_equal(out, np.array([2.0, 0.0, 2.0, 0.0], dtype=np.float32))


def test_ram_epsilon_sets_what_is_active():
    # epsilon 1.5: model 1's entry 0 (1.0) is inactive -> entry 0 is model 2's 3 alone
    out = run("ram", [D1, D2], [0.0] * 4, epsilon=1.5)
    np.testing.assert_allclose(out, [3.0, 0.0, 2.0, 0.0], rtol=0, atol=1e-7)


def test_ramplus_by_hand():
    # model 1: 1 shared, 1 unique -> ratio 1, boost 1 + 0.1 * min(1, 0.2) = 1.02
    # model 2: no unique entry -> ratio 0; entry 0 shared: (1 + 3) / 2
    out = run("ramplus_tl", [D1, D2], [0.0] * 4)
    np.testing.assert_allclose(out, [2.0, 0.0, 2.0 * 1.02, 0.0], rtol=0, atol=1e-6)
    out = run("ramplus_tl", [D1, D2], [0.0] * 4, r=0.5, alpha=2.0)  # boost 1 + 0.5 * 1
    np.testing.assert_allclose(out, [2.0, 0.0, 3.0, 0.0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
def test_random_sparse_task_vectors_match_reference(name: str):
    rng = np.random.default_rng(6)
    base = rng.normal(size=(8, 9)).astype(np.float32)
    xs = []
    for keep in (0.3, 0.5, 0.7):  # each model changes a random part of the entries
        delta = rng.normal(size=base.shape) * (rng.random(base.shape) < keep)
        xs.append((base + delta).astype(np.float32))
    params = {"epsilon": 1e-4, "r": 0.3, "alpha": 0.9} if name == "ramplus_tl" else {}
    out = run(name, xs, base, **params)
    expected = ram_ref(xs, base, 1e-4, plus=name == "ramplus_tl", r=0.3, alpha=0.9)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
def test_merge_matches_reference(llama_models, merge, name: str):
    a, b, c = llama_models
    # the tiny models' task vectors are ~N(0, 0.03^2): epsilon 0.02 makes about half of
    # each model's entries inactive, so unique and shared entries both occur
    out = merge({
        "merge_method": name,
        "base_model": str(a),
        "models": [{"model": str(b)}, {"model": str(c)}],
        "parameters": {"epsilon": 0.02},
    })
    A, B, C, M = load_state(a), load_state(b), load_state(c), load_state(out)
    for tensor in ["model.layers.0.self_attn.v_proj.weight", "lm_head.weight"]:
        expected = ram_ref([B[tensor].numpy(), C[tensor].numpy()], A[tensor].numpy(), 0.02,
                           plus=name == "ramplus_tl")
        np.testing.assert_allclose(M[tensor].numpy(), expected, rtol=1e-5, atol=1e-6,
                                   err_msg=tensor)
