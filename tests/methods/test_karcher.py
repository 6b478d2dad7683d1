"""karcher: the weighted Riemannian (Karcher) mean of the inputs' directions on the sphere,
scaled by their weighted mean norm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import load_state
from pydantic import ValidationError

from mergekit.config import parse_config
from mergekit.errors import MergeError
from mergekit.methods.karcher import MAX_ITER
from mergekit.methods.registry import get_method


def run(tensors: list, weights: list[float] | None = None, **params: object) -> np.ndarray:
    method = get_method("karcher")
    xs = [torch.as_tensor(np.asarray(x, dtype=np.float32)) for x in tensors]
    w = tuple(weights) if weights is not None else (1.0,) * len(xs)
    out = method.fn(xs, None, method.make_params({"weight": w, **params}))
    assert out.dtype == torch.float32 and tuple(out.shape) == tuple(xs[0].shape)
    return out.numpy()


def karcher_ref(xs: list[np.ndarray], weights: list[float], max_iter: int = 10,
                tol: float = 1e-5) -> np.ndarray:
    """The fixed-point iteration, in float64, written from the spec."""
    shape = np.asarray(xs[0]).shape
    vs = [np.asarray(x, np.float64).ravel() for x in xs]
    w = np.asarray(weights, np.float64) / sum(weights)
    norms = np.array([np.linalg.norm(v) for v in vs])
    live = [i for i in range(len(vs)) if norms[i] > 1e-8]
    if not live:
        return np.zeros(shape)
    units = {i: vs[i] / norms[i] for i in live}
    m = sum(w[i] * units[i] for i in live)
    m = m / np.linalg.norm(m)
    for _ in range(max_iter):
        tau = np.zeros_like(m)
        for i in live:
            cos = float(np.clip(units[i] @ m, -1.0, 1.0))
            theta = math.acos(cos)
            scale = theta / math.sin(theta) if math.sin(theta) > 1e-8 else 1.0
            tau += w[i] * scale * (units[i] - cos * m)
        tau /= sum(w[i] for i in live)
        length = np.linalg.norm(tau)
        if length < tol:
            break
        m = math.cos(length) * m + math.sin(length) * tau / length
        m = m / np.linalg.norm(m)
    return (m * float(w @ norms)).reshape(shape)


def geodesic_point(u: np.ndarray, v: np.ndarray, t: float) -> np.ndarray:
    theta = math.acos(float(np.clip(u @ v, -1, 1)))
    return (math.sin((1 - t) * theta) * u + math.sin(t * theta) * v) / math.sin(theta)


def test_two_orthogonal_vectors_by_hand():
    # midpoint of [1, 0] and [0, 1] is [s, s]; mean norm (2 + 4) / 2 = 3
    s = math.sqrt(0.5)
    np.testing.assert_allclose(run([[2.0, 0.0], [0.0, 4.0]]), [3 * s, 3 * s], rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize("weights, t", [((1.0, 1.0), 0.5), ((1.0, 3.0), 0.75),
                                        ((2.0, 1.0), 1 / 3)])
def test_two_inputs_give_the_point_along_the_geodesic(weights: tuple[float, float], t: float):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(2, 5, 3)).astype(np.float32)
    out = run([x, y], list(weights))
    nx, ny = np.linalg.norm(x.astype(np.float64)), np.linalg.norm(y.astype(np.float64))
    direction = geodesic_point(x.ravel() / nx, y.ravel() / ny, t)
    scale = (weights[0] * nx + weights[1] * ny) / sum(weights)
    np.testing.assert_allclose(out.ravel(), direction * scale, rtol=1e-4, atol=1e-5)


def test_zero_vectors_do_not_pull_the_direction():
    # direction from x alone; scale 1/2 |x| + 1/2 * 0
    x = np.array([[3.0, -1.0], [2.0, 0.5]], dtype=np.float32)
    out = run([x, np.zeros_like(x)])
    np.testing.assert_allclose(out, 0.5 * x, rtol=1e-6, atol=1e-6)


def test_random_three_inputs_match_reference():
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=(6, 4)).astype(np.float32) for _ in range(3)]
    weights = [0.5, 1.0, 2.0]
    np.testing.assert_allclose(run(xs, weights), karcher_ref(xs, weights), rtol=1e-5,
                               atol=1e-5)


def test_max_iter_bounds_the_iterations():
    # three directions off one great circle: one step from the chord mean does not reach the
    # Karcher mean yet
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(3,)).astype(np.float32) for _ in range(3)]
    weights = [1.0, 2.0, 4.0]
    one = run(xs, weights, max_iter=1)
    many = run(xs, weights, max_iter=50)
    np.testing.assert_allclose(one, karcher_ref(xs, weights, max_iter=1), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(many, karcher_ref(xs, weights, max_iter=50), rtol=1e-5,
                               atol=1e-6)
    assert not np.allclose(one, many, rtol=0, atol=1e-4)


def test_merge_matches_reference(llama_models, merge):
    a, b, c = llama_models
    out = merge({
        "merge_method": "karcher",
        "models": [{"model": str(m), "parameters": {"weight": w}}
                   for m, w in ((a, 1.0), (b, 2.0), (c, 1.0))],
    })
    A, B, C, M = load_state(a), load_state(b), load_state(c), load_state(out)
    for name in ["model.layers.1.self_attn.o_proj.weight", "lm_head.weight"]:
        expected = karcher_ref([A[name].numpy(), B[name].numpy(), C[name].numpy()],
                               [1.0, 2.0, 1.0])
        np.testing.assert_allclose(M[name].numpy(), expected, rtol=1e-4, atol=1e-6,
                                   err_msg=name)


# -- bounds: a recipe cannot make the iteration endless ----------------------------------------

@pytest.mark.parametrize("params, message", [
    ({"max_iter": 1_000_000_000, "tol": 0.001},
     f"max_iter: 1000000000 is out of range: input should be less than or equal to {MAX_ITER}"),
    ({"tol": 0}, "tol: 0 is out of range: input should be greater than 0"),
    ({"tol": [1e-5, -1e-5]}, "tol: -1e-05 is out of range: input should be greater than 0"),
    ({"max_iter": -1}, "max_iter: -1 is out of range: input should be greater than or equal "
     "to 0"),
])
def test_recipe_bounds(params: dict, message: str):
    recipe = {"merge_method": "karcher", "models": [{"model": "org/a"}, {"model": "org/b"}],
              "parameters": params}
    with pytest.raises(MergeError) as info:
        parse_config(recipe)
    assert info.value.exit_code == 2
    assert str(info.value) == f"recipe: parameters.{message}"


@pytest.mark.parametrize("params", [{"max_iter": MAX_ITER + 1}, {"tol": 0.0}, {"tol": -1.0},
                                    {"max_iter": "10"}, {"tol": True}])
def test_params_model_bounds(params: dict):
    with pytest.raises(ValidationError):
        get_method("karcher").make_params({"weight": (1.0, 1.0), **params})


def test_most_iterations_with_a_tol_never_reached():
    # tol below what float64 rounding lets the step reach: every iteration runs
    rng = np.random.default_rng(4)
    xs = [rng.normal(size=(5,)).astype(np.float32) for _ in range(4)]
    weights = [1.0, 2.0, 3.0, 4.0]
    np.testing.assert_allclose(run(xs, weights, max_iter=MAX_ITER, tol=1e-300),
                               karcher_ref(xs, weights, max_iter=MAX_ITER, tol=1e-300),
                               rtol=1e-5, atol=1e-6)


def test_a_base_model_is_one_more_point():
    """With a base, the mean is over the inputs and the base (weight 1), as mergekit 0.1.x
    averages it in: checked against a float64 Karcher mean on the sphere written here."""
    import numpy as np
    import torch

    from mergekit.methods.karcher import KarcherParams, karcher

    g = np.random.default_rng(5)
    pts = [g.standard_normal(32) * s for s in (1.0, 2.0, 0.5)]
    units = [p / np.linalg.norm(p) for p in pts]
    m = sum(units)
    m /= np.linalg.norm(m)
    for _ in range(500):  # the fixed point: exp_m(mean of log_m(u_i))
        logs = []
        for u in units:
            c = np.clip(u @ m, -1, 1)
            th = np.arccos(c)
            logs.append((u - c * m) * (th / np.sin(th) if th > 1e-12 else 1.0))
        v = sum(logs) / 3
        step = np.linalg.norm(v)
        if step < 1e-14:
            break
        m = np.cos(step) * m + np.sin(step) * v / step
        m /= np.linalg.norm(m)
    want = m * np.mean([np.linalg.norm(p) for p in pts])
    a, b, base = (torch.tensor(p, dtype=torch.float32) for p in pts)
    params = KarcherParams(weight=(1.0, 1.0), max_iter=1000, tol=1e-12)
    got = karcher([a, b], base, params).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    without = karcher([a, b], None, params).double().numpy()
    assert np.abs(without - want).max() > 1e-3  # leaving the base out would fail
