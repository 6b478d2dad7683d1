"""ties: trim task vectors by magnitude, elect a sign per entry, average the agreeing ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_state

from mergekit.methods.registry import get_method

BASE = [[1.0, 1.0, 1.0], [-1.0, 0.5, 2.0]]
# task vectors (x - base) of the two models of the hand-computed cases
D1 = [[1.0, -2.0, 3.0], [0.0, 4.0, -1.0]]
D2 = [[2.0, 1.0, -1.0], [-3.0, 0.0, -2.0]]


def run_ties(deltas: list, base: list, **params: object) -> np.ndarray:
    """Run the registered ties on inputs given as task vectors over ``base``."""
    method = get_method("ties")
    b = torch.tensor(base, dtype=torch.float32)
    tensors = [b + torch.tensor(d, dtype=torch.float32) for d in deltas]
    n = len(deltas)
    values = {"density": (1.0,) * n, **params}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    out = method.fn(tensors, b, method.make_params(values))
    assert out.dtype == torch.float32 and tuple(out.shape) == tuple(b.shape)
    return out.numpy()


def ties_ref(xs: list[np.ndarray], base: np.ndarray, weights: list[float],
             densities: list[float], normalize: bool = True, lam: float = 1.0,
             consensus: str = "sum") -> np.ndarray:
    """Element-by-element TIES in float64, written from the spec."""
    base = np.asarray(base, dtype=np.float64)
    deltas = []
    for x, density in zip(xs, densities):
        delta = (np.asarray(x, dtype=np.float64) - base).ravel()
        if density < 1.0:
            k = int(density * delta.size)
            order = np.argsort(-np.abs(delta), kind="stable")
            trimmed = np.zeros_like(delta)
            trimmed[order[:k]] = delta[order[:k]]
            delta = trimmed
        deltas.append(delta)
    out = np.empty(base.size)
    for j in range(base.size):
        weighted = [w * d[j] for w, d in zip(weights, deltas)]
        if consensus == "sum":
            vote = sum(weighted)
        else:
            vote = sum(np.sign(v) for v in weighted)
        elected = 1.0 if vote >= 0 else -1.0
        kept = [(w, v) for w, v in zip(weights, weighted) if v != 0 and np.sign(v) == elected]
        mixed = sum(v for _, v in kept)
        if normalize:
            divisor = sum(w for w, _ in kept)
            mixed = mixed / (divisor if divisor != 0 else 1.0)
        out[j] = base.flat[j] + lam * mixed
    return out.reshape(base.shape)


def test_sign_conflict_and_normalize_by_hand():
    # weights 1, 2: weighted deltas  w1*d1 = [[1,-2,3],[0,4,-1]], w2*d2 = [[4,2,-2],[-6,0,-4]]
    # sums [[5,0,1],[-6,4,-5]] -> elected [[+,+,+],[-,+,-]] (a zero sum elects +)
    # kept sums   [[1+4, 2, 3], [-6, 4, -1-4]]
    # kept weights [[1+2, 2, 1], [2, 1, 1+2]]
    out = run_ties([D1, D2], BASE, weight=[1.0, 2.0])
    mixed = np.array([[5 / 3, 1.0, 3.0], [-3.0, 4.0, -5 / 3]])
    np.testing.assert_allclose(out, np.array(BASE) + mixed, rtol=0, atol=1e-6)


def test_normalize_off_by_hand():
    out = run_ties([D1, D2], BASE, weight=[1.0, 2.0], normalize=False)
    mixed = np.array([[5.0, 2.0, 3.0], [-6.0, 4.0, -5.0]])
    np.testing.assert_allclose(out, np.array(BASE) + mixed, rtol=0, atol=1e-6)


def test_lambda_scales_the_merged_task_vector():
    out = run_ties([D1, D2], BASE, weight=[1.0, 2.0], **{"lambda": 0.5})
    mixed = np.array([[5 / 3, 1.0, 3.0], [-3.0, 4.0, -5 / 3]])
    np.testing.assert_allclose(out, np.array(BASE) + 0.5 * mixed, rtol=0, atol=1e-6)


def test_density_half_by_hand():
    # numel 6, density 0.5 -> keep int(3.0) = 3 entries per task vector:
    # d1 -> [[0,-2,3],[0,4,0]],  d2 -> [[2,0,0],[-3,0,-2]]
    # weights 1, 3: w2*d2 = [[6,0,0],[-9,0,-6]]; no sign conflict left.
    # mixed = [[6,-2,3],[-9,4,-6]]; trimmed (zero) entries never count in the divisor:
    # divisor = [[3,1,1],[3,1,3]]
    out = run_ties([D1, D2], BASE, weight=[1.0, 3.0], density=[0.5, 0.5])
    mixed = np.array([[2.0, -2.0, 3.0], [-3.0, 4.0, -2.0]])
    np.testing.assert_allclose(out, np.array(BASE) + mixed, rtol=0, atol=1e-6)


def test_consensus_count_differs_from_sum():
    # entry [0,0]: weighted deltas +1 (w=1) and -5 (w=5)
    #   sum: -4 -> elect -, keep -5 / 5 = -1
    #   count: one + and one - -> tie elects +, keep +1 / 1 = 1
    d1 = [[1.0, 0.0, 0.0]]
    d2 = [[-1.0, 0.0, 0.0]]
    base = [[0.0, 0.0, 0.0]]
    by_sum = run_ties([d1, d2], base, weight=[1.0, 5.0], consensus="sum")
    by_count = run_ties([d1, d2], base, weight=[1.0, 5.0], consensus="count")
    np.testing.assert_allclose(by_sum, [[-1.0, 0.0, 0.0]], rtol=0, atol=1e-6)
    np.testing.assert_allclose(by_count, [[1.0, 0.0, 0.0]], rtol=0, atol=1e-6)


def test_consensus_count_majority_of_three():
    # deltas 1, 1, -5 (equal weights): sum elects - (-5), count elects + ((1+1)/2)
    deltas = [[[1.0]], [[1.0]], [[-5.0]]]
    base = [[2.0]]
    by_sum = run_ties(deltas, base, weight=[1.0, 1.0, 1.0])
    by_count = run_ties(deltas, base, weight=[1.0, 1.0, 1.0], consensus="count")
    np.testing.assert_allclose(by_sum, [[2.0 - 5.0]], rtol=0, atol=1e-6)
    np.testing.assert_allclose(by_count, [[2.0 + 1.0]], rtol=0, atol=1e-6)


def test_all_deltas_zero_gives_base_not_nan():
    # every divisor is zero here; it counts as 1
    zero = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    out = run_ties([zero, zero], BASE, weight=[1.0, 2.0])
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, np.array(BASE, dtype=np.float32))


def test_weights_cancelling_on_kept_entries_do_not_give_inf():
    # weights 1 and -1 with deltas 1 and -1: both weighted +1 -> kept; divisor 1 + -1 = 0 -> 1
    out = run_ties([[[1.0]], [[-1.0]]], [[0.0]], weight=[1.0, -1.0])
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, [[2.0]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("density", [0.1, 0.25, 0.3, 0.5, 0.77, 0.99])
def test_density_keeps_exactly_int_density_numel_largest(density: float):
    rng = np.random.default_rng(1)
    base = rng.normal(size=(4, 5)).astype(np.float32)
    delta = rng.normal(size=(4, 5)).astype(np.float32)
    method = get_method("ties")
    b = torch.from_numpy(base)
    x = b + torch.from_numpy(delta)
    params = method.make_params({"weight": (1.0,), "density": (density,), "normalize": False})
    kept = (method.fn([x], b, params) - b).numpy()
    k = int(density * delta.size)
    assert np.count_nonzero(kept) == k
    d = (x - b).numpy()
    largest = np.argsort(-np.abs(d).ravel())[:k]
    np.testing.assert_allclose(kept.ravel()[largest], d.ravel()[largest], rtol=1e-6, atol=1e-6)


def test_density_so_small_keeps_the_single_largest_entry():
    # int(0.1 * 6) = 0, but at least one entry is kept (as the established tool does):
    # D1 keeps its 4.0 at (1, 1), D2 its -3.0 at (1, 0); each alone elects its own sign.
    out = run_ties([D1, D2], BASE, weight=[1.0, 1.0], density=[0.1, 0.1])
    expected = np.array(BASE, dtype=np.float32) + np.array([[0, 0, 0], [-3.0, 4.0, 0]])
    np.testing.assert_array_equal(out, expected.astype(np.float32))


@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_random_three_models_match_reference(consensus: str, normalize: bool):
    rng = np.random.default_rng(2)
    base = rng.normal(size=(6, 8)).astype(np.float32)
    xs = [(base + rng.normal(size=base.shape)).astype(np.float32) for _ in range(3)]
    weights, densities = [0.7, 1.3, -0.4], [0.5, 1.0, 0.3]
    method = get_method("ties")
    params = method.make_params({"weight": tuple(weights), "density": tuple(densities),
                                 "normalize": normalize, "lambda": 0.8,
                                 "consensus": consensus})
    out = method.fn([torch.from_numpy(x) for x in xs], torch.from_numpy(base), params)
    expected = ties_ref(xs, base, weights, densities, normalize, 0.8, consensus)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


# -- end to end ----------------------------------------------------------------------------


def test_merge_matches_reference(llama_models, merge):
    a, b, c = llama_models
    out = merge({
        "merge_method": "ties",
        "base_model": str(a),
        "models": [
            {"model": str(a)},
            {"model": str(b), "parameters": {"weight": 1.0, "density": 0.5}},
            # c: density 0.3 on attention, 0.8 elsewhere
            {"model": str(c), "parameters": {"weight": 0.6, "density": [
                {"filter": "self_attn", "value": 0.3}, {"value": 0.8}]}},
        ],
        "parameters": {"lambda": 1.5},
    })
    A, B, C, M = load_state(a), load_state(b), load_state(c), load_state(out)
    names = [
        ("model.layers.0.self_attn.k_proj.weight", 0.3),
        ("model.layers.3.self_attn.v_proj.weight", 0.3),
        ("model.layers.2.mlp.gate_proj.weight", 0.8),
        ("model.layers.1.post_attention_layernorm.weight", 0.8),
        ("model.embed_tokens.weight", 0.8),
        ("lm_head.weight", 0.8),
    ]
    for name, density_c in names:
        expected = ties_ref([B[name].numpy(), C[name].numpy()], A[name].numpy(), [1.0, 0.6],
                            [0.5, density_c], lam=1.5)
        np.testing.assert_allclose(M[name].numpy(), expected, rtol=1e-5, atol=1e-5,
                                   err_msg=name)
    assert set(M) == set(A)
