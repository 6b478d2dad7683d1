"""model_stock: interpolate between the base and the models' mean by a ratio set by the
angle between their task vectors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import load_state

from mergekit.errors import MergeError
from mergekit.methods.registry import get_method


def run(tensors: list, base: list | np.ndarray, filter_wise: bool = False) -> np.ndarray:
    method = get_method("model_stock")
    b = torch.as_tensor(np.asarray(base, dtype=np.float32))
    xs = [torch.as_tensor(np.asarray(x, dtype=np.float32)) for x in tensors]
    out = method.fn(xs, b, method.make_params({"filter_wise": filter_wise}))
    assert out.dtype == torch.float32 and tuple(out.shape) == tuple(b.shape)
    return out.numpy()


def stock(vectors: list[np.ndarray], base: np.ndarray) -> np.ndarray:
    """One flat vector: t from the mean pairwise cosine of the task vectors."""
    deltas = [v - base for v in vectors]
    n = len(vectors)
    cosines = [
        float(deltas[i] @ deltas[j]) / (np.linalg.norm(deltas[i]) * np.linalg.norm(deltas[j]))
        for i in range(n) for j in range(i + 1, n)
    ]
    cos = sum(cosines) / len(cosines)
    t = n * cos / (1 + (n - 1) * cos)
    return t * np.mean(vectors, axis=0) + (1 - t) * base


def model_stock_ref(xs: list[np.ndarray], base: np.ndarray, filter_wise: bool = False
                    ) -> np.ndarray:
    xs = [np.asarray(x, dtype=np.float64) for x in xs]
    base = np.asarray(base, dtype=np.float64)
    if filter_wise and base.ndim == 2:
        rows = [stock([x[r] for x in xs], base[r]) for r in range(base.shape[0])]
        return np.stack(rows)
    return stock([x.ravel() for x in xs], base.ravel()).reshape(base.shape)


def test_orthogonal_task_vectors_give_the_base():
    # cos 0 -> t 0
    out = run([[2.0, 1.0], [1.0, 2.0]], [1.0, 1.0])
    np.testing.assert_allclose(out, [1.0, 1.0], rtol=0, atol=1e-6)


def test_by_hand_45_degrees():
    # deltas [1, 0] and [1, 1]: cos = 1/sqrt(2); N = 2 -> t = 2c / (1 + c)
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    out = run([[1.0, 0.0], [1.0, 1.0]], [0.0, 0.0])
    np.testing.assert_allclose(out, [t * 1.0, t * 0.5], rtol=1e-6)


def test_parallel_task_vectors_give_the_mean():
    # cos 1 -> t 1
    out = run([[1.0, 2.0], [2.0, 3.0]], [0.0, 1.0])
    np.testing.assert_allclose(out, [1.5, 2.5], rtol=1e-6)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_random_matches_reference(n: int):
    rng = np.random.default_rng(n)
    base = rng.normal(size=(6, 5)).astype(np.float32)
    shared = rng.normal(size=base.shape)  # correlated task vectors: t well inside (0, 1)
    xs = [(base + shared + 0.7 * rng.normal(size=base.shape)).astype(np.float32)
          for _ in range(n)]
    np.testing.assert_allclose(run(xs, base), model_stock_ref(xs, base), rtol=1e-5, atol=1e-5)


def test_filter_wise_uses_one_ratio_per_row():
    rng = np.random.default_rng(9)
    base = rng.normal(size=(4, 8)).astype(np.float32)
    shared = rng.normal(size=base.shape) * np.array([[0.1], [1.0], [3.0], [0.5]])
    xs = [(base + shared + rng.normal(size=base.shape)).astype(np.float32) for _ in range(3)]
    out = run(xs, base, filter_wise=True)
    np.testing.assert_allclose(out, model_stock_ref(xs, base, filter_wise=True), rtol=1e-5,
                               atol=1e-5)
    assert not np.allclose(out, model_stock_ref(xs, base), rtol=1e-4, atol=1e-4)


def test_filter_wise_on_a_vector_is_the_whole_tensor():
    rng = np.random.default_rng(10)
    base = rng.normal(size=(9,)).astype(np.float32)
    xs = [(base + rng.normal(size=base.shape) + 1.0).astype(np.float32) for _ in range(2)]
    np.testing.assert_allclose(run(xs, base, filter_wise=True), model_stock_ref(xs, base),
                               rtol=1e-5, atol=1e-5)


def test_merge_matches_reference(llama_models, merge):
    a, b, c = llama_models
    out = merge({
        "merge_method": "model_stock",
        "base_model": str(a),
        "models": [{"model": str(b)}, {"model": str(c)}],
    })
    A, B, C, M = load_state(a), load_state(b), load_state(c), load_state(out)
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"]:
        expected = model_stock_ref([B[name].numpy(), C[name].numpy()], A[name].numpy())
        np.testing.assert_allclose(M[name].numpy(), expected, rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_merge_filter_wise_matches_reference(llama_models, merge):
    a, b, c = llama_models
    out = merge({
        "merge_method": "model_stock",
        "base_model": str(a),
        "models": [{"model": str(b)}, {"model": str(c)}],
        "parameters": {"filter_wise": True},
    })
    A, B, C, M = load_state(a), load_state(b), load_state(c), load_state(out)
    name = "model.layers.2.mlp.down_proj.weight"
    expected = model_stock_ref([B[name].numpy(), C[name].numpy()], A[name].numpy(), True)
    np.testing.assert_allclose(M[name].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_one_model_besides_the_base_is_refused(llama_models, merge):
    a, b, _ = llama_models
    with pytest.raises(MergeError, match="at least 2"):
        merge({"merge_method": "model_stock", "base_model": str(a),
               "models": [{"model": str(a)}, {"model": str(b)}]})
