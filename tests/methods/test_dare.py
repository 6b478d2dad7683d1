"""dare_linear / dare_ties: drop task-vector entries at random, rescale, combine."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_state
from conftest import run_method as run
from pydantic import ValidationError

from mergekit.methods.registry import get_method

SHAPE = (200, 200)


def big_delta(seed: int = 0) -> np.ndarray:
    """A task vector with no zero entry (so kept entries are exactly the nonzero ones)."""
    rng = np.random.default_rng(seed)
    d = rng.normal(size=SHAPE).astype(np.float32)
    return np.where(d == 0, 1.0, d).astype(np.float32)


ZERO = np.zeros(SHAPE, dtype=np.float32)


@pytest.mark.parametrize("name, other", [("dare_linear", "task_arithmetic"),
                                         ("dare_ties", "ties")])
@pytest.mark.parametrize("normalize", [True, False])
def test_density_one_equals_the_deterministic_method(name: str, other: str, normalize: bool):
    rng = np.random.default_rng(3)
    base = rng.normal(size=(6, 9)).astype(np.float32)
    xs = [(base + rng.normal(size=base.shape)).astype(np.float32) for _ in range(3)]
    params = dict(weight=[0.5, 1.5, -0.3], density=[1.0, 1.0, 1.0], normalize=normalize,
                  **{"lambda": 1.3})
    np.testing.assert_array_equal(run(name, xs, base, seed=11, **params),
                                  run(other, xs, base, **params))


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_kept_fraction_is_density_and_kept_entries_unchanged(name: str, density: float):
    d = big_delta()
    out = run(name, [d], ZERO, weight=[1.0], density=[density], rescale=False, seed=5)
    kept = out != 0
    # 40000 Bernoulli draws: the standard deviation of the fraction is at most 0.0025
    assert abs(kept.mean() - density) < 0.015
    np.testing.assert_array_equal(out[kept], d[kept])


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_l1_rescale_restores_each_task_vectors_l1_norm(name: str):
    d = big_delta(1)
    out = run(name, [d], ZERO, weight=[1.0], density=[0.3], seed=2)  # rescale l1 by default
    kept = out != 0
    assert 0.25 < kept.mean() < 0.35
    factor = np.abs(d).astype(np.float64).sum() / np.abs(d[kept]).astype(np.float64).sum()
    np.testing.assert_allclose(out[kept], d[kept] * factor, rtol=1e-5)
    np.testing.assert_allclose(np.abs(out).astype(np.float64).sum(),
                               np.abs(d).astype(np.float64).sum(), rtol=1e-5)


def test_l1_rescale_is_per_model():
    # two task vectors on disjoint halves of the tensor: the output's left half is the first
    # model's rescaled kept entries, its right half the second's, each with its own factor
    left = np.zeros(SHAPE, dtype=np.float32)
    right = np.zeros(SHAPE, dtype=np.float32)
    left[:, :100] = big_delta(2)[:, :100]
    right[:, 100:] = 5.0 * big_delta(3)[:, 100:]
    out = run("dare_linear", [left, right], ZERO, weight=[1.0, 1.0], density=[0.4, 0.7],
              seed=9)
    for d, cols, density in ((left, slice(0, 100), 0.4), (right, slice(100, 200), 0.7)):
        part = out[:, cols]
        kept = part != 0
        assert abs(kept.mean() - density) < 0.02
        np.testing.assert_allclose(np.abs(part).astype(np.float64).sum(),
                                   np.abs(d).astype(np.float64).sum(), rtol=1e-5)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_inverse_density_divides_kept_entries_by_density(name: str):
    d = big_delta(4)
    out = run(name, [d], ZERO, weight=[1.0], density=[0.25], rescale_mode="inverse_density",
              seed=3)
    kept = out != 0
    assert abs(kept.mean() - 0.25) < 0.015
    np.testing.assert_allclose(out[kept], d[kept] / 0.25, rtol=1e-6)


def test_weights_lambda_and_normalize_apply_after_dropping():
    d = big_delta(5)
    base = np.full(SHAPE, 0.5, dtype=np.float32)
    raw = run("dare_linear", [base + d], base, weight=[1.0], density=[0.5], rescale=False,
              seed=4)
    kept = raw != base
    scaled = run("dare_linear", [base + d], base, weight=[3.0], density=[0.5], rescale=False,
                 seed=4, **{"lambda": 0.5})
    np.testing.assert_allclose(scaled[kept], base[kept] + 1.5 * (raw - base)[kept], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(scaled[~kept], base[~kept])
    normalized = run("dare_linear", [base + d], base, weight=[3.0], density=[0.5],
                     rescale=False, seed=4, normalize=True)
    np.testing.assert_allclose(normalized, raw, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("consensus, p_plus", [("sum", 0.25), ("count", 0.5)])
def test_dare_ties_elects_a_sign_among_the_kept_entries(consensus: str, p_plus: float):
    # task vectors +1 and -3 everywhere, each entry kept with probability 1/2:
    #   both kept: sum elects - (-3), count ties and elects + (+1); one kept: that one; none: 0
    # never the linear sum -2
    plus = np.ones(SHAPE, dtype=np.float32)
    minus = np.full(SHAPE, -3.0, dtype=np.float32)
    out = run("dare_ties", [plus, minus], ZERO, weight=[1.0, 1.0], density=[0.5, 0.5],
              rescale=False, consensus=consensus, seed=8)
    assert set(np.unique(out).tolist()) == {-3.0, 0.0, 1.0}
    assert abs((out == 1.0).mean() - p_plus) < 0.015
    assert abs((out == 0.0).mean() - 0.25) < 0.015
    linear = run("dare_linear", [plus, minus], ZERO, weight=[1.0, 1.0], density=[0.5, 0.5],
                 rescale=False, seed=8)
    assert (linear == -2.0).any()


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_same_seed_same_bits_other_seed_other_bits(name: str):
    d = big_delta(6)[:50, :50]
    base = np.zeros_like(d)
    first = run(name, [d, -d * 0.5], base, weight=[1.0, 1.0], density=[0.5, 0.5], seed=123)
    again = run(name, [d, -d * 0.5], base, weight=[1.0, 1.0], density=[0.5, 0.5], seed=123)
    other = run(name, [d, -d * 0.5], base, weight=[1.0, 1.0], density=[0.5, 0.5], seed=124)
    assert first.tobytes() == again.tobytes()
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("density", [-0.1, 1.5])
def test_density_outside_unit_interval_is_rejected(name: str, density: float):
    with pytest.raises(ValidationError):
        get_method(name).make_params({"weight": (1.0,), "density": (density,)})


def test_defaults():
    params = get_method("dare_ties").make_params({"weight": (1.0,), "density": (0.5,)})
    assert params.rescale is True and params.rescale_mode == "l1"
    assert params.normalize is False and params.consensus == "sum"


# -- end to end ----------------------------------------------------------------------------


def test_merge_density_one_matches_task_arithmetic(llama_models, merge):
    a, b, c = llama_models
    out = merge({
        "merge_method": "dare_linear",
        "base_model": str(a),
        "models": [
            {"model": str(b), "parameters": {"weight": 0.6, "density": 1.0}},
            {"model": str(c), "parameters": {"weight": 0.4, "density": 1.0}},
        ],
    }, random_seed=1)
    A, B, C, M = load_state(a), load_state(b), load_state(c), load_state(out)
    for name in ["model.layers.2.mlp.up_proj.weight", "model.embed_tokens.weight"]:
        base = A[name].double()
        expected = base + 0.6 * (B[name].double() - base) + 0.4 * (C[name].double() - base)
        np.testing.assert_allclose(M[name].numpy(), expected.numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_merge_drops_entries_of_the_sparse_model(llama_models, merge):
    a, b, c = llama_models
    out = merge({
        "merge_method": "dare_linear",
        "base_model": str(a),
        "models": [
            {"model": str(b), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(c), "parameters": {"weight": 0.5, "density": 1.0}},
        ],
        "parameters": {"rescale": False},
    }, random_seed=2)
    A, B, C, M = load_state(a), load_state(b), load_state(c), load_state(out)
    name = "model.layers.0.mlp.gate_proj.weight"  # 512 entries
    base = A[name].double().numpy()
    db = B[name].double().numpy() - base
    rest = M[name].double().numpy() - base - 0.5 * (C[name].double().numpy() - base)
    # each entry of b's task vector is either dropped or kept unchanged
    dropped = np.isclose(rest, 0.0, atol=1e-6)
    kept = np.isclose(rest, db, atol=1e-6)
    assert (dropped | kept).all()
    assert 0.4 < kept.mean() < 0.6


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_merge_pass_reuses_the_masks_drawn_for_the_l1_rescale(name: str, monkeypatch):
    """prepare keeps the masks it drew (packed); the merge pass of each row chunk then
    draws nothing, and gives the bits of drawing the masks again."""
    import torch

    import mergekit.methods.task_vectors as task_vectors

    method = get_method(name)
    rng = np.random.default_rng(5)
    base = torch.from_numpy(rng.normal(size=(40, 30)).astype(np.float32))
    xs = [base + torch.from_numpy(rng.normal(size=(40, 30)).astype(np.float32))
          for _ in range(2)]
    values = {"weight": (0.6, 0.4), "density": (0.3, 0.7), "seed": 7}
    if "epsilon" in method.params_model.model_fields:  # della
        values["epsilon"] = (0.1, 0.2)
    params = method.params_model.model_validate(values)
    chunks = [([x[:20] for x in xs], base[:20], 0), ([x[20:] for x in xs], base[20:], 600)]
    prepared = method.prepare(lambda: chunks, params)
    assert set(prepared.masks) == {(0, 0), (0, 1), (600, 0), (600, 1)}
    fresh = prepared.model_copy(update={"masks": None})
    draws = []
    real = task_vectors.uniform
    monkeypatch.setattr(task_vectors, "uniform", lambda *a: draws.append(a) or real(*a))
    for tensors, chunk_base, offset in chunks:
        reused = method.fn(tensors, chunk_base, prepared.model_copy(update={"offset": offset}))
        assert not draws
        again = method.fn(tensors, chunk_base, fresh.model_copy(update={"offset": offset}))
        assert len(draws) == 2  # one per model: the masks drawn again
        draws.clear()
        assert torch.equal(reused, again)


@pytest.mark.parametrize("shape", [(13,), (3, 7), (2, 4, 8)])
def test_packed_masks_unpack_to_the_same_mask(shape):
    import torch

    from mergekit.methods.task_vectors import pack_mask, unpack_mask

    mask = (torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.4).float()
    packed = pack_mask(mask)
    assert packed.nbytes == -(-mask.numel() // 8)  # one bit per entry
    like = torch.empty(shape, dtype=torch.float32)
    assert torch.equal(unpack_mask(packed, like), mask)
