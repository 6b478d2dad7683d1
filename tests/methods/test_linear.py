"""linear: sum w_i x_i, divided by sum w_i when normalize is on (the default)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_state

from mergekit.methods.registry import get_method


def run_linear(xs: list[list[float]], weights: list[float], **params: object) -> np.ndarray:
    method = get_method("linear")
    tensors = [torch.tensor(x, dtype=torch.float32) for x in xs]
    out = method.fn(tensors, None, method.make_params({"weight": tuple(weights), **params}))
    assert out.dtype == torch.float32
    return out.numpy()


def linear_ref(xs: list[np.ndarray], weights: list[float], normalize: bool = True) -> np.ndarray:
    total = np.zeros_like(np.asarray(xs[0], dtype=np.float64))
    for w, x in zip(weights, xs):
        total += w * np.asarray(x, dtype=np.float64)
    return total / sum(weights) if normalize else total


def test_weighted_average_by_hand():
    # (1*1 + 3*3) / 4 = 2.5 ; (1*2 + 3*-4) / 4 = -2.5
    out = run_linear([[1.0, 2.0], [3.0, -4.0]], [1.0, 3.0])
    np.testing.assert_allclose(out, [2.5, -2.5], rtol=0, atol=1e-6)


def test_normalize_off_gives_the_plain_weighted_sum():
    out = run_linear([[1.0, 2.0], [3.0, -4.0]], [1.0, 3.0], normalize=False)
    np.testing.assert_allclose(out, [10.0, -10.0], rtol=0, atol=1e-6)


def test_negative_weight():
    # (2*1 - 1*3) / 1 = -1 ; (2*2 - 1*-4) / 1 = 8
    out = run_linear([[1.0, 2.0], [3.0, -4.0]], [2.0, -1.0])
    np.testing.assert_allclose(out, [-1.0, 8.0], rtol=0, atol=1e-6)


def test_zero_weight_sum_gives_finite_unnormalised_sum():
    out = run_linear([[1.0, 2.0], [3.0, -4.0]], [1.0, -1.0])
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, [-2.0, 6.0], rtol=0, atol=1e-6)


def test_all_zero_weights_give_zeros():
    out = run_linear([[1.0, 2.0], [3.0, -4.0]], [0.0, 0.0])
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, [0.0, 0.0])


@pytest.mark.parametrize("normalize", [True, False])
def test_three_random_tensors_match_numpy(normalize: bool):
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(5, 7)).astype(np.float32) for _ in range(3)]
    weights = [0.5, 1.5, -0.25]
    out = run_linear([x.tolist() for x in xs], weights, normalize=normalize)
    np.testing.assert_allclose(out, linear_ref(xs, weights, normalize), rtol=1e-5, atol=1e-6)


def test_single_model_weight_two_normalised_is_the_model():
    x = [[0.25, -3.0, 7.5]]
    np.testing.assert_allclose(run_linear([x], [2.0]), x, rtol=0, atol=1e-6)


# -- end to end ----------------------------------------------------------------------------


def test_merge_with_filters_and_gradient(llama_models, merge):
    a, b, c = llama_models
    out = merge({
        "merge_method": "linear",
        "models": [
            # a: 3 on attention, 1 elsewhere
            {"model": str(a), "parameters": {"weight": [
                {"filter": "self_attn", "value": 3.0}, {"value": 1.0}]}},
            {"model": str(b), "parameters": {"weight": 1.0}},
            # c: gradient 0 -> 2 over the 4 layers (weight 2*i/3 on layer i; 0 outside layers)
            {"model": str(c), "parameters": {"weight": [0.0, 2.0]}},
        ],
    })
    A, B, C, M = load_state(a), load_state(b), load_state(c), load_state(out)

    def check(name: str, wa: float, wb: float, wc: float) -> None:
        expected = linear_ref([A[name].numpy(), B[name].numpy(), C[name].numpy()], [wa, wb, wc])
        np.testing.assert_allclose(M[name].numpy(), expected, rtol=1e-5, atol=1e-6,
                                   err_msg=name)

    for i in range(4):
        wc = 2.0 * i / 3
        check(f"model.layers.{i}.self_attn.q_proj.weight", 3.0, 1.0, wc)
        check(f"model.layers.{i}.self_attn.o_proj.weight", 3.0, 1.0, wc)
        check(f"model.layers.{i}.mlp.down_proj.weight", 1.0, 1.0, wc)
    # non-layer tensors sit at t=0 of the gradient: c's weight is 0 there
    check("model.embed_tokens.weight", 1.0, 1.0, 0.0)
    check("lm_head.weight", 1.0, 1.0, 0.0)
    assert M["model.embed_tokens.weight"].dtype == torch.float32


def test_merge_normalize_off(llama_models, merge):
    a, b, _ = llama_models
    out = merge({
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                   {"model": str(b), "parameters": {"weight": 0.25}}],
        "parameters": {"normalize": False},
    })
    A, B, M = load_state(a), load_state(b), load_state(out)
    for name in ("model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"):
        expected = 0.5 * A[name].double() + 0.25 * B[name].double()
        np.testing.assert_allclose(M[name].numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
