"""multislerp: one exponential step from the normalised mean direction of several models
(or task vectors), scaled by their weighted mean norm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import load_state

from mergekit.methods.registry import get_method


def run(tensors: list, weights: list[float], base: list | np.ndarray | None = None,
        **params: object) -> np.ndarray:
    method = get_method("multislerp")
    xs = [torch.as_tensor(np.asarray(x, dtype=np.float32)) for x in tensors]
    b = None if base is None else torch.as_tensor(np.asarray(base, dtype=np.float32))
    out = method.fn(xs, b, method.make_params({"weight": tuple(weights), **params}))
    assert out.dtype == torch.float32 and tuple(out.shape) == tuple(xs[0].shape)
    return out.numpy()


def multislerp_ref(xs: list[np.ndarray], weights: list[float], base: np.ndarray | None = None,
                   normalize_weights: bool = True, eps: float = 1e-8) -> np.ndarray:
    shape = np.asarray(xs[0]).shape
    vs = [np.asarray(x, np.float64).ravel() for x in xs]
    if base is not None:
        vs = [v - np.asarray(base, np.float64).ravel() for v in vs]
    w = np.asarray(weights, np.float64)
    if normalize_weights:
        w = w / w.sum()
    norms = [np.linalg.norm(v) for v in vs]
    us = [v / (n + eps) for v, n in zip(vs, norms)]
    m = sum(wi * u for wi, u in zip(w, us))
    if np.linalg.norm(m) < eps:
        out = sum(wi * v for wi, v in zip(w, vs))
    else:
        m = m / np.linalg.norm(m)
        tau = sum(wi * (u - (u @ m) * m) for wi, u in zip(w, us))
        length = np.linalg.norm(tau) + eps
        r = math.cos(length) * m + math.sin(length) * tau / length
        out = r * sum(wi * n for wi, n in zip(w, norms))
    out = out.reshape(shape)
    return out + np.asarray(base, np.float64) if base is not None else out


def test_two_orthogonal_unit_vectors_by_hand():
    # m = [s, s]; the tangents cancel; scale = mean norm 1
    s = math.sqrt(0.5)
    np.testing.assert_allclose(run([[1.0, 0.0], [0.0, 1.0]], [1.0, 1.0]), [s, s], rtol=0,
                               atol=1e-6)


def test_unnormalised_weights_scale_by_the_summed_norms():
    s = math.sqrt(0.5)
    out = run([[1.0, 0.0], [0.0, 1.0]], [1.0, 1.0], normalize_weights=False)
    np.testing.assert_allclose(out, [2 * s, 2 * s], rtol=0, atol=1e-6)


def test_opposite_directions_fall_back_to_the_weighted_sum():
    # u1 + u2 = 0: no mean direction -> sum w_i x_i = 0.5 * [2, 0] + 0.5 * [-2, 0]
    np.testing.assert_allclose(run([[2.0, 0.0], [-2.0, 0.0]], [1.0, 1.0]), [0.0, 0.0],
                               atol=1e-6)
    out = run([[3.0, 1.0], [-1.0, 1.0]], [1.0, 1.0], base=[1.0, 1.0])  # task vectors ±[2, 0]
    np.testing.assert_allclose(out, [1.0, 1.0], atol=1e-6)


def test_a_single_model_is_returned_unchanged():
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_array_equal(run([x], [0.3]), x)
    np.testing.assert_array_equal(run([x], [0.3], base=np.ones_like(x)), x)


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize_weights", [True, False])
def test_random_matches_reference(with_base: bool, normalize_weights: bool):
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=(4, 6)).astype(np.float32) for _ in range(3)]
    base = rng.normal(size=(4, 6)).astype(np.float32) if with_base else None
    weights = [0.2, 0.5, 0.3] if normalize_weights else [0.2, 0.3, 0.1]
    out = run(xs, weights, base=base, normalize_weights=normalize_weights)
    expected = multislerp_ref(xs, weights, base, normalize_weights)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_merge_matches_reference(llama_models, merge):
    a, b, c = llama_models
    out = merge({
        "merge_method": "multislerp",
        "base_model": str(a),
        "models": [{"model": str(b), "parameters": {"weight": 1.0}},
                   {"model": str(c), "parameters": {"weight": 2.0}}],
    })
    A, B, C, M = load_state(a), load_state(b), load_state(c), load_state(out)
    for name in ["model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"]:
        expected = multislerp_ref([B[name].numpy(), C[name].numpy()], [1.0, 2.0],
                                  A[name].numpy())
        np.testing.assert_allclose(M[name].numpy(), expected, rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_merge_without_base_matches_reference(llama_models, merge):
    a, b, c = llama_models
    out = merge({
        "merge_method": "multislerp",
        "models": [{"model": str(m), "parameters": {"weight": w}}
                   for m, w in ((a, 0.5), (b, 0.3), (c, 0.2))],
    })
    A, B, C, M = load_state(a), load_state(b), load_state(c), load_state(out)
    name = "model.layers.2.self_attn.v_proj.weight"
    expected = multislerp_ref([A[name].numpy(), B[name].numpy(), C[name].numpy()],
                              [0.5, 0.3, 0.2])
    np.testing.assert_allclose(M[name].numpy(), expected, rtol=1e-5, atol=1e-6)
