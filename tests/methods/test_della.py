"""della / della_linear: drop task-vector entries with a probability set by their magnitude
rank within the row, rescale, combine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_state
from conftest import run_method as run
from pydantic import ValidationError

from mergekit.methods.registry import get_method
from mergekit.methods.task_vectors import della_probabilities

SHAPE = (200, 200)
ZERO = np.zeros(SHAPE, dtype=np.float32)


def probabilities_ref(delta: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """Per row: rank r of |delta| ascending, p = density - eps + 2 eps r / (n - 1)."""
    rows = delta.reshape(-1, delta.shape[-1])
    n = rows.shape[1]
    out = np.empty(rows.shape)
    for i, row in enumerate(rows):
        order = sorted(range(n), key=lambda j: abs(row[j]))
        for r, j in enumerate(order):
            position = r / (n - 1) if n > 1 else 0.5
            out[i, j] = density - epsilon + 2 * epsilon * position
    return out.reshape(delta.shape)


def big_delta(seed: int) -> np.ndarray:
    d = np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)
    return np.where(d == 0, 1.0, d).astype(np.float32)


def test_probabilities_by_hand():
    # |row| ranks: 0.1 -> 0, 0.2 -> 1, 0.3 -> 2, 0.5 -> 3; p = 0.35 + 0.1 * rank
    row = torch.tensor([[0.3, -0.1, 0.5, -0.2], [4.0, 3.0, 2.0, 1.0]])
    p = della_probabilities(row, 0.5, 0.15)
    np.testing.assert_allclose(p.numpy(), [[0.55, 0.35, 0.65, 0.45], [0.65, 0.55, 0.45, 0.35]],
                               rtol=0, atol=1e-6)


def test_probabilities_match_reference():
    delta = np.random.default_rng(0).normal(size=(3, 5, 7)).astype(np.float32)
    p = della_probabilities(torch.from_numpy(delta), 0.4, 0.2)
    np.testing.assert_allclose(p.numpy(), probabilities_ref(delta, 0.4, 0.2), rtol=0,
                               atol=1e-6)


def test_probability_of_a_one_entry_row_is_density():
    p = della_probabilities(torch.tensor([[3.0], [-1.0]]), 0.6, 0.1)
    np.testing.assert_allclose(p.numpy(), [[0.6], [0.6]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_small_magnitudes_are_dropped_more_often(name: str):
    d = big_delta(1)
    out = run(name, [d], ZERO, weight=[1.0], density=[0.5], epsilon=[0.15], rescale=False,
              seed=4)
    kept = out != 0
    np.testing.assert_array_equal(out[kept], d[kept])
    ranks = np.argsort(np.argsort(np.abs(d), axis=1, kind="stable"), axis=1)
    low, high = kept[ranks < 100].mean(), kept[ranks >= 100].mean()
    # expected: mean p over ranks 0..99 = 0.35 + 0.3 * 49.5 / 199, and 0.65 - that - 0.35
    expected_low = 0.35 + 0.3 * 49.5 / 199
    assert abs(low - expected_low) < 0.02
    assert abs(high - (1.0 - expected_low)) < 0.02
    assert abs(kept.mean() - 0.5) < 0.015


def test_inverse_density_divides_each_entry_by_its_own_probability():
    d = big_delta(2)
    out = run("della_linear", [d], ZERO, weight=[1.0], density=[0.4], epsilon=[0.2],
              rescale_mode="inverse_density", seed=1)
    kept = out != 0
    p = probabilities_ref(d, 0.4, 0.2)
    np.testing.assert_allclose(out[kept], d[kept] / p[kept], rtol=1e-5)


def test_epsilon_is_per_model():
    # disjoint supports: each half of the output is one model's kept entries / its own p
    left = np.zeros(SHAPE, dtype=np.float32)
    right = np.zeros(SHAPE, dtype=np.float32)
    left[:, :100] = big_delta(3)[:, :100]
    right[:, 100:] = big_delta(4)[:, 100:]
    out = run("della_linear", [left, right], ZERO, weight=[1.0, 1.0], density=[0.5, 0.6],
              epsilon=[0.05, 0.3], rescale_mode="inverse_density", seed=2)
    for d, density, eps, cols in ((left, 0.5, 0.05, slice(0, 100)),
                                  (right, 0.6, 0.3, slice(100, 200))):
        p = probabilities_ref(d, density, eps)[:, cols]
        part, dd = out[:, cols], d[:, cols]
        kept = part != 0
        np.testing.assert_allclose(part[kept], dd[kept] / p[kept], rtol=1e-5)


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_l1_rescale_by_default(name: str):
    d = big_delta(5)
    out = run(name, [d], ZERO, weight=[1.0], density=[0.3], epsilon=[0.1], seed=3)
    kept = out != 0
    assert 0.25 < kept.mean() < 0.35
    factor = np.abs(d).astype(np.float64).sum() / np.abs(d[kept]).astype(np.float64).sum()
    np.testing.assert_allclose(out[kept], d[kept] * factor, rtol=1e-5)


def test_della_elects_a_sign():
    # task vectors +1 and -3 everywhere: with sign consensus the sum -2 never appears
    plus = np.ones(SHAPE, dtype=np.float32)
    minus = np.full(SHAPE, -3.0, dtype=np.float32)
    params = dict(weight=[1.0, 1.0], density=[0.5, 0.5], epsilon=[0.1, 0.1], rescale=False,
                  seed=6)
    out = run("della", [plus, minus], ZERO, **params)
    assert set(np.unique(out).tolist()) == {-3.0, 0.0, 1.0}
    assert abs((out == 1.0).mean() - 0.25) < 0.02
    linear = run("della_linear", [plus, minus], ZERO, **params)
    assert set(np.unique(linear).tolist()) == {-3.0, -2.0, 0.0, 1.0}


def test_della_density_one_equals_ties():
    rng = np.random.default_rng(7)
    base = rng.normal(size=(5, 6)).astype(np.float32)
    xs = [(base + rng.normal(size=base.shape)).astype(np.float32) for _ in range(3)]
    weights = [1.0, 0.4, 0.7]
    della = run("della", xs, base, weight=weights, density=[1.0] * 3, epsilon=[0.15] * 3,
                seed=1)
    ties = run("ties", xs, base, weight=weights, density=[1.0] * 3)  # normalize by default
    np.testing.assert_array_equal(della, ties)


def test_della_linear_density_one_equals_task_arithmetic():
    rng = np.random.default_rng(8)
    base = rng.normal(size=(5, 6)).astype(np.float32)
    xs = [(base + rng.normal(size=base.shape)).astype(np.float32) for _ in range(2)]
    della = run("della_linear", xs, base, weight=[1.0, 0.4], density=[1.0, 1.0],
                epsilon=[0.15, 0.15], seed=1)
    ta = run("task_arithmetic", xs, base, weight=[1.0, 0.4])
    np.testing.assert_array_equal(della, ta)


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_same_seed_same_bits_other_seed_other_bits(name: str):
    d = big_delta(9)[:40, :40]
    base = np.zeros_like(d)
    params = dict(weight=[1.0, 1.0], density=[0.5, 0.5], epsilon=[0.15, 0.15])
    first = run(name, [d, 0.5 * d], base, seed=77, **params)
    again = run(name, [d, 0.5 * d], base, seed=77, **params)
    other = run(name, [d, 0.5 * d], base, seed=78, **params)
    assert first.tobytes() == again.tobytes()
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("density, epsilon", [(0.1, 0.15), (0.9, 0.15), (0.5, 0.5),
                                              (1.5, 0.1), (-0.2, 0.1)])
def test_probabilities_must_stay_inside_the_unit_interval(name: str, density: float,
                                                          epsilon: float):
    with pytest.raises(ValidationError):
        get_method(name).make_params({"weight": (1.0,), "density": (density,),
                                      "epsilon": (epsilon,)})


def test_density_one_accepts_any_epsilon_and_defaults():
    method = get_method("della")
    method.make_params({"weight": (1.0,), "density": (1.0,), "epsilon": (0.15,)})
    params = method.make_params({"weight": (1.0,), "density": (0.5,), "epsilon": (0.15,)})
    assert params.normalize is True and params.rescale is True
    assert params.rescale_mode == "l1" and params.consensus == "sum"
    linear = get_method("della_linear").make_params({"weight": (1.0,), "density": (0.5,),
                                                     "epsilon": (0.15,)})
    assert linear.normalize is False
    assert method.param("epsilon").default == 0.15


# -- end to end ----------------------------------------------------------------------------


def test_merge_density_one_matches_ties_reference(llama_models, merge):
    a, b, c = llama_models
    out = merge({
        "merge_method": "della",
        "base_model": str(a),
        "models": [
            {"model": str(b), "parameters": {"weight": 1.0, "density": 1.0}},
            {"model": str(c), "parameters": {"weight": 0.5, "density": 1.0}},
        ],
    }, random_seed=3)
    A, B, C, M = load_state(a), load_state(b), load_state(c), load_state(out)
    name = "model.layers.1.mlp.down_proj.weight"
    base = A[name].double().numpy()
    deltas = [B[name].double().numpy() - base, C[name].double().numpy() - base]
    weighted = [1.0 * deltas[0], 0.5 * deltas[1]]
    elected = np.where(weighted[0] + weighted[1] >= 0, 1.0, -1.0)
    agree = [np.sign(w) == elected for w in weighted]
    mixed = weighted[0] * agree[0] + weighted[1] * agree[1]
    divisor = 1.0 * agree[0] + 0.5 * agree[1]
    expected = base + mixed / np.where(divisor == 0, 1.0, divisor)
    np.testing.assert_allclose(M[name].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_merge_linear_drops_entries(llama_models, merge):
    a, b, _ = llama_models
    out = merge({
        "merge_method": "della_linear",
        "base_model": str(a),
        "models": [{"model": str(b), "parameters": {"weight": 1.0, "density": 0.5,
                                                     "epsilon": 0.1}}],
        "parameters": {"rescale": False},
    }, random_seed=4)
    A, B, M = load_state(a), load_state(b), load_state(out)
    name = "model.embed_tokens.weight"  # 64 x 16
    base, x, m = A[name].numpy(), B[name].numpy(), M[name].numpy()
    from_base, from_model = m == base, np.isclose(m, x, rtol=0, atol=1e-6)
    assert (from_base | from_model).all()
    assert 0.4 < from_model.mean() < 0.6
