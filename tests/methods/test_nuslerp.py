"""nuslerp: slerp of two models (or of their task vectors) at t = w2 / (w1 + w2), over the
whole tensor, its rows or its columns."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import load_state

from mergekit.errors import MergeError
from mergekit.methods.registry import get_method


def run(a: list | np.ndarray, b: list | np.ndarray, weights: tuple[float, float],
        base: list | np.ndarray | None = None, **params: object) -> np.ndarray:
    method = get_method("nuslerp")
    xs = [torch.as_tensor(np.asarray(x, dtype=np.float32)) for x in (a, b)]
    bt = None if base is None else torch.as_tensor(np.asarray(base, dtype=np.float32))
    out = method.fn(xs, bt, method.make_params({"weight": weights, **params}))
    assert out.dtype == torch.float32 and tuple(out.shape) == tuple(xs[0].shape)
    return out.numpy()


def slerp_vec(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(max(-1.0, min(1.0, cos)))
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def nuslerp_ref(a: np.ndarray, b: np.ndarray, weights: tuple[float, float],
                base: np.ndarray | None = None, flatten: bool = True,
                row_wise: bool = False) -> np.ndarray:
    t = weights[1] / (weights[0] + weights[1])
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if base is not None:
        a, b = a - base, b - base
    if flatten:
        out = slerp_vec(a.ravel(), b.ravel(), t).reshape(a.shape)
    elif not row_wise:
        out = np.stack([slerp_vec(a[i, :], b[i, :], t) for i in range(a.shape[0])])
    else:
        out = np.stack([slerp_vec(a[:, j], b[:, j], t) for j in range(a.shape[1])], axis=1)
    return out + base if base is not None else out


def test_orthogonal_unit_vectors_equal_weights():
    s = math.sqrt(0.5)
    np.testing.assert_allclose(run([1.0, 0.0], [0.0, 1.0], (1.0, 1.0)), [s, s], rtol=0,
                               atol=1e-6)


def test_weights_set_t():
    # weights (1, 3): t = 3/4 -> angle 3/4 * 90 degrees from a
    angle = 0.75 * math.pi / 2
    out = run([2.0, 0.0], [0.0, 2.0], (1.0, 3.0))
    np.testing.assert_allclose(out, [2 * math.cos(angle), 2 * math.sin(angle)], rtol=0,
                               atol=1e-6)


def test_colinear_vectors_are_lerped():
    out = run([1.0, 2.0, 3.0], [2.0, 4.0, 6.0], (3.0, 1.0))  # t = 1/4
    np.testing.assert_allclose(out, [1.25, 2.5, 3.75], rtol=1e-6)
    opposite = run([1.0, 2.0, 3.0], [-2.0, -4.0, -6.0], (3.0, 1.0))  # cos -1: lerp too
    np.testing.assert_allclose(opposite, [0.25, 0.5, 0.75], rtol=1e-6)


def test_with_base_slerps_the_task_vectors():
    # task vectors [1, 0] and [0, 1] around the base [5, -5]
    s = math.sqrt(0.5)
    out = run([6.0, -5.0], [5.0, -4.0], (1.0, 1.0), base=[5.0, -5.0])
    np.testing.assert_allclose(out, [5.0 + s, -5.0 + s], rtol=0, atol=1e-6)


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("flatten, row_wise", [(True, False), (False, False), (False, True)])
def test_random_matches_reference(with_base: bool, flatten: bool, row_wise: bool):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 5, 7)).astype(np.float32)
    base = rng.normal(size=(5, 7)).astype(np.float32) if with_base else None
    out = run(a, b, (0.3, 0.9), base=base, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    expected = nuslerp_ref(a, b, (0.3, 0.9), base, flatten, row_wise)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_rows_and_columns_differ_by_hand():
    # a = [[1, 0], [0, 1]], b = [[0, 1], [1, 0]], t = 1/2
    # rows: [1,0]->[0,1] and [0,1]->[1,0] are orthogonal: each half-way is [s, s]
    s = math.sqrt(0.5)
    a = [[1.0, 0.0], [0.0, 1.0]]
    rows = run(a, [[0.0, 1.0], [1.0, 0.0]], (1.0, 1.0), nuslerp_flatten=False)
    np.testing.assert_allclose(rows, [[s, s], [s, s]], rtol=0, atol=1e-6)
    # b = [[0, 1], [0, 1]]: rows: [1,0]->[0,1] half-way [s, s]; [0,1]->[0,1] stays [0, 1]
    # columns: [1,0]->[0,0] and [0,1]->[1,1]; the second is slerped 45 deg -> half-way
    b = [[0.0, 1.0], [0.0, 1.0]]
    rows = run(a, b, (1.0, 1.0), nuslerp_flatten=False)
    np.testing.assert_allclose(rows, [[s, s], [0.0, 1.0]], rtol=0, atol=1e-6)
    cols = run(a, b, (1.0, 1.0), nuslerp_flatten=False, nuslerp_row_wise=True)
    assert not np.allclose(cols, rows, atol=1e-3)
    np.testing.assert_allclose(cols[:, 1], slerp_vec(np.array([0.0, 1.0]),
                                                     np.array([1.0, 1.0]), 0.5), atol=1e-6)


def test_merge_with_base_matches_reference(llama_models, merge):
    a, b, c = llama_models
    out = merge({
        "merge_method": "nuslerp",
        "base_model": str(a),
        "models": [{"model": str(b), "parameters": {"weight": 1.0}},
                   {"model": str(c), "parameters": {"weight": 2.0}}],
    })
    A, B, C, M = load_state(a), load_state(b), load_state(c), load_state(out)
    for name in ["model.layers.1.self_attn.k_proj.weight", "lm_head.weight"]:
        expected = nuslerp_ref(B[name].numpy(), C[name].numpy(), (1.0, 2.0),
                               A[name].numpy().astype(np.float64))
        np.testing.assert_allclose(M[name].numpy(), expected, rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_merge_rows_without_base_matches_reference(llama_models, merge):
    _, b, c = llama_models
    out = merge({
        "merge_method": "nuslerp",
        "models": [{"model": str(b), "parameters": {"weight": 0.7}},
                   {"model": str(c), "parameters": {"weight": 0.3}}],
        "parameters": {"nuslerp_flatten": False},
    })
    B, C, M = load_state(b), load_state(c), load_state(out)
    name = "model.layers.3.mlp.gate_proj.weight"
    expected = nuslerp_ref(B[name].numpy(), C[name].numpy(), (0.7, 0.3), flatten=False)
    np.testing.assert_allclose(M[name].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_three_models_are_refused(llama_models, merge):
    a, b, c = llama_models
    with pytest.raises(MergeError, match="at most 2"):
        merge({"merge_method": "nuslerp",
               "models": [{"model": str(m), "parameters": {"weight": 1.0}}
                          for m in (a, b, c)]})


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 7, 40])
def test_column_sums_do_not_depend_on_the_chunking(rows_per_chunk: int):
    """Columns are interpolated with sums over the whole tensor's rows, gathered chunk by
    chunk by the prepare pass: any chunking gives the whole tensor's bits, and those match
    the float64 reference."""
    from mergekit.methods.nuslerp import prepare_nuslerp

    rng = np.random.default_rng(5)
    # rows over a few octaves: float64 sums added in another order round differently
    scale = np.exp2(rng.integers(-3, 4, size=(40, 1, 1)))
    a, b, base = (rng.normal(size=(3, 40, 6, 5)) * scale).astype(np.float32)
    method = get_method("nuslerp")
    params = method.make_params({"weight": (1.0, 2.0), "nuslerp_flatten": False,
                                 "nuslerp_row_wise": True})
    ta, tb, tbase = (torch.as_tensor(x) for x in (a, b, base))
    whole = method.fn([ta, tb], tbase, params)
    spans = [(i, min(i + rows_per_chunk, 40)) for i in range(0, 40, rows_per_chunk)]
    prepared = prepare_nuslerp(
        lambda: [([ta[i:j], tb[i:j]], tbase[i:j]) for i, j in spans], params)
    assert torch.equal(prepared.column_sums,
                       prepare_nuslerp(lambda: [([ta, tb], tbase)], params).column_sums)
    chunked = torch.cat([method.fn([ta[i:j], tb[i:j]], tbase[i:j], prepared)
                         for i, j in spans])
    assert torch.equal(whole, chunked)
    expected = nuslerp_ref(a.reshape(40, 30), b.reshape(40, 30), (1.0, 2.0),
                           base.reshape(40, 30).astype(np.float64), flatten=False,
                           row_wise=True).reshape(a.shape)
    np.testing.assert_allclose(whole.numpy() / scale, expected / scale, rtol=1e-5, atol=1e-5)


def test_nearly_colinear_vectors_are_interpolated_spherically():
    """Two 64-element norms of cosine 0.99953 (the established tool's case): nuslerp
    interpolates on the sphere unless 1 - cos^2 <= 1e-16, as mergekit 0.1.x does, so it
    matches the float64 formula; classic slerp's 0.9995 rule would be 1e-4 off."""
    import numpy as np
    import torch

    from mergekit.methods.nuslerp import NuSlerpParams, nuslerp

    g = np.random.default_rng(3)
    a = 1.0 + 0.05 * g.standard_normal(64)
    b = a + 0.028 * g.standard_normal(64) * np.abs(a).mean()
    cos = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert 0.9995 < cos < 0.99999
    t = 0.3 / (0.7 + 0.3)
    theta = np.arccos(cos)
    want = (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)
    got = nuslerp([torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)],
                  None, NuSlerpParams(weight=(0.7, 0.3))).double().numpy()
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)
    linear = (1 - t) * a + t * b
    assert np.abs(linear - want).max() > 1e-5  # the linear rule would fail this test
