"""breadcrumbs / breadcrumbs_ties: drop the largest outliers and the small tail of each
task vector, keep the magnitude band between them, combine."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_state
from conftest import run_method as run
from pydantic import ValidationError

from mergekit.methods.registry import get_method

# a 1x10 task vector with distinct magnitudes; by magnitude, descending, its indices are
#   9 (1.0), 1 (0.9), 6 (0.8), 4 (0.7), 8 (0.6), 2 (0.5), 7 (0.4), 3 (0.3), 5 (0.2), 0 (0.1)
ROW = [[0.1, -0.9, 0.5, 0.3, -0.7, 0.2, 0.8, -0.4, 0.6, 1.0]]


def one(delta: list, density: float, gamma: float, **params: object) -> np.ndarray:
    """breadcrumbs of a single task vector over a zero base, weight 1."""
    zero = np.zeros_like(np.asarray(delta, dtype=np.float32))
    return run("breadcrumbs", [delta], zero, weight=[1.0], density=[density], gamma=[gamma],
               **params)


def keep_only(indices: list[int]) -> np.ndarray:
    row = np.asarray(ROW, dtype=np.float32)
    out = np.zeros_like(row)
    out[0, indices] = row[0, indices]
    return out


def test_band_by_hand():
    # n 10, density 0.5, gamma 0.1: keep 5, drop the top min(1, 10 - 5) = 1 (index 9)
    np.testing.assert_array_equal(one(ROW, 0.5, 0.1), keep_only([1, 6, 4, 8, 2]))


def test_drop_count_is_capped_by_what_density_keeps():
    # density 0.8 keeps 8; gamma 0.3 would drop 3, capped at 10 - 8 = 2 (indices 9, 1)
    np.testing.assert_array_equal(one(ROW, 0.8, 0.3), keep_only([6, 4, 8, 2, 7, 3, 5, 0]))


def test_tiny_tensor_with_no_outlier_to_drop_still_keeps_its_share():
    # gamma 0.01 * 10 < 1: nothing dropped from the top, the largest 5 kept
    np.testing.assert_array_equal(one(ROW, 0.5, 0.01), keep_only([9, 1, 6, 4, 8]))
    np.testing.assert_array_equal(one(ROW, 0.3, 0.05), keep_only([9, 1, 6]))


def test_density_one_keeps_everything():
    np.testing.assert_array_equal(one(ROW, 1.0, 0.2), np.asarray(ROW, dtype=np.float32))


def test_rescale_restores_the_l1_norm():
    # kept [0.9, 0.5, 0.7, 0.8, 0.6] (L1 3.5) of L1 5.5
    out = one(ROW, 0.5, 0.1, rescale=True)
    np.testing.assert_allclose(out, keep_only([1, 6, 4, 8, 2]) * (5.5 / 3.5), rtol=1e-6)


def band_ref(delta: np.ndarray, density: float, gamma: float, rescale: bool) -> np.ndarray:
    flat = delta.astype(np.float64).ravel()
    n = flat.size
    if density >= 1.0:
        return flat.reshape(delta.shape)
    keep_count = int(density * n)
    drop = min(int(gamma * n), n - keep_count)
    order = sorted(range(n), key=lambda i: -abs(flat[i]))
    out = np.zeros(n)
    for i in order[drop:drop + keep_count]:
        out[i] = flat[i]
    if rescale and np.abs(out).sum() > 0:
        out *= np.abs(flat).sum() / np.abs(out).sum()
    return out.reshape(delta.shape)


def breadcrumbs_ref(xs: list[np.ndarray], base: np.ndarray, weights: list[float],
                    densities: list[float], gammas: list[float], *, ties: bool,
                    rescale: bool = False, normalize: bool = False, lam: float = 1.0
                    ) -> np.ndarray:
    base = np.asarray(base, dtype=np.float64)
    deltas = [band_ref(np.asarray(x, np.float32) - np.asarray(base, np.float32), d, g, rescale)
              for x, d, g in zip(xs, densities, gammas)]
    out = np.empty(base.size)
    for j in range(base.size):
        weighted = [w * d.flat[j] for w, d in zip(weights, deltas)]
        pairs = list(zip(weights, weighted))
        if ties:
            elected = 1.0 if sum(weighted) >= 0 else -1.0
            pairs = [(w, v) for w, v in pairs if v != 0 and np.sign(v) == elected]
        mixed = sum(v for _, v in pairs)
        if normalize:
            divisor = sum(w for w, _ in pairs)
            mixed = mixed / (divisor if divisor != 0 else 1.0)
        out[j] = base.flat[j] + lam * mixed
    return out.reshape(base.shape)


def test_ties_variant_by_hand():
    # d1 = ROW banded (density 0.5, gamma 0.1) = [0, -.9, .5, 0, -.7, 0, .8, 0, .6, 0]
    # d2 = [-1, -1, -1, ...] all kept (density 1): per entry sums elect
    #   idx 0: -1 -> keep d2 (-1); idx 1: -1.9 -> both; idx 2: -0.5 -> d2; idx 6: -0.2 -> d2
    # so only d1's negative entries survive
    d2 = [[-1.0] * 10]
    zero = np.zeros((1, 10), dtype=np.float32)
    out = run("breadcrumbs_ties", [ROW, d2], zero, weight=[1.0, 1.0], density=[0.5, 1.0],
              gamma=[0.1, 0.1])
    expected = np.full((1, 10), -1.0)
    expected[0, 1] = -1.9
    expected[0, 4] = -1.7
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    linear = run("breadcrumbs", [ROW, d2], zero, weight=[1.0, 1.0], density=[0.5, 1.0],
                 gamma=[0.1, 0.1])
    np.testing.assert_allclose(linear, keep_only([1, 6, 4, 8, 2]) - 1.0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("rescale, normalize", [(False, False), (True, True)])
def test_random_matches_reference(name: str, rescale: bool, normalize: bool):
    rng = np.random.default_rng(4)
    base = rng.normal(size=(8, 10)).astype(np.float32)
    xs = [(base + rng.normal(size=base.shape)).astype(np.float32) for _ in range(3)]
    weights, densities, gammas = [1.0, 0.5, 0.8], [0.6, 0.3, 1.0], [0.05, 0.2, 0.1]
    out = run(name, xs, base, weight=weights, density=densities, gamma=gammas,
              rescale=rescale, normalize=normalize, **{"lambda": 1.2})
    expected = breadcrumbs_ref(xs, base, weights, densities, gammas,
                               ties=name == "breadcrumbs_ties", rescale=rescale,
                               normalize=normalize, lam=1.2)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_defaults():
    params = get_method("breadcrumbs_ties").make_params({"weight": (1.0,), "density": (0.5,),
                                                          "gamma": (0.01,)})
    assert params.rescale is False and params.normalize is False
    assert get_method("breadcrumbs").param("gamma").default == 0.01


@pytest.mark.parametrize("field, value", [("density", 1.2), ("density", -0.5),
                                          ("gamma", 1.0), ("gamma", -0.1)])
def test_out_of_range_values_are_rejected(field: str, value: float):
    values = {"weight": (1.0,), "density": (0.5,), "gamma": (0.01,), field: (value,)}
    with pytest.raises(ValidationError):
        get_method("breadcrumbs").make_params(values)


def test_merge_matches_reference(llama_models, merge):
    a, b, c = llama_models
    out = merge({
        "merge_method": "breadcrumbs_ties",
        "base_model": str(a),
        "models": [
            {"model": str(b), "parameters": {"weight": 1.0, "density": 0.6, "gamma": 0.05}},
            {"model": str(c), "parameters": {"weight": 0.5, "density": 0.4}},
        ],
    })
    A, B, C, M = load_state(a), load_state(b), load_state(c), load_state(out)
    for name in ["model.layers.3.self_attn.o_proj.weight", "lm_head.weight"]:
        expected = breadcrumbs_ref([B[name].numpy(), C[name].numpy()], A[name].numpy(),
                                   [1.0, 0.5], [0.6, 0.4], [0.05, 0.01], ties=True)
        np.testing.assert_allclose(M[name].numpy(), expected, rtol=1e-5, atol=1e-6,
                                   err_msg=name)


@pytest.mark.parametrize("density, gamma", [(0.5, 0.1), (0.3, 0.0), (0.9, 0.05), (0.02, 0.3)])
def test_equal_magnitudes_rank_in_index_order(density: float, gamma: float):
    """Task vectors of a few distinct magnitudes (as bfloat16 deltas have): the band's
    edges fall among equal values, which rank in index order, as a stable sort orders
    them (the reference sorts; the method selects)."""
    rng = np.random.default_rng(7)
    delta = (rng.integers(-4, 5, size=(60, 35)) / 4).astype(np.float32)
    expected = band_ref(delta, density, gamma, rescale=False)
    np.testing.assert_array_equal(one(delta, density, gamma), expected.astype(np.float32))


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 7, 60])
@pytest.mark.parametrize("rescale", [False, True])
def test_row_chunks_keep_what_the_whole_tensor_keeps(rows_per_chunk: int, rescale: bool):
    """The prepare pass counts, for each row chunk, the entries equal to the band's edges
    before it, so chunks merged one by one give the whole tensor's result, here with many
    equal magnitudes at the edges."""
    import torch

    from mergekit.methods.breadcrumbs import prepare_breadcrumbs

    method = get_method("breadcrumbs_ties")
    rng = np.random.default_rng(11)
    base = torch.from_numpy((rng.integers(-3, 4, size=(60, 35)) / 8).astype(np.float32))
    xs = [base + torch.from_numpy((rng.integers(-4, 5, size=(60, 35)) / 4).astype(np.float32))
          for _ in range(2)]
    params = method.make_params({"weight": (0.6, 0.5), "density": (0.4, 0.7),
                                 "gamma": (0.1, 0.02), "rescale": rescale})
    whole = method.fn(xs, base, params)
    starts = range(0, 60, rows_per_chunk)
    chunks = [([x[r:r + rows_per_chunk] for x in xs], base[r:r + rows_per_chunk], r * 35)
              for r in starts]
    prepared = prepare_breadcrumbs(lambda: chunks, params)
    parts = [method.fn(c_xs, c_base, prepared.model_copy(update={"offset": offset}))
             for c_xs, c_base, offset in chunks]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)
    expected = breadcrumbs_ref([x.numpy() for x in xs], base.numpy(), [0.6, 0.5], [0.4, 0.7],
                               [0.1, 0.02], ties=True, rescale=rescale)
    np.testing.assert_allclose(whole.numpy(), expected, rtol=1e-5, atol=1e-6)
