"""passthrough: copy one source per tensor, optionally scaled."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_state

from mergekit.methods.registry import get_method


def run_passthrough(x: list, **params: object) -> np.ndarray:
    method = get_method("passthrough")
    values = {k: (v,) for k, v in params.items()}  # scale is per model
    out = method.fn([torch.tensor(x, dtype=torch.float32)], None, method.make_params(values))
    assert out.dtype == torch.float32
    return out.numpy()


def test_default_scale_copies():
    x = [[1.5, -2.0], [0.0, 3.25]]
    np.testing.assert_array_equal(run_passthrough(x, scale=1.0), x)


@pytest.mark.parametrize("scale", [2.5, 0.0, -1.0])
def test_scale_multiplies(scale: float):
    x = [[1.5, -2.0], [0.0, 3.25]]
    expected = [[scale * v for v in row] for row in x]
    np.testing.assert_allclose(run_passthrough(x, scale=scale), expected, rtol=0, atol=1e-6)


def test_scale_does_not_modify_the_input():
    method = get_method("passthrough")
    x = torch.tensor([1.0, 2.0, 3.0])
    method.fn([x], None, method.make_params({"scale": (4.0,)}))
    np.testing.assert_array_equal(x.numpy(), [1.0, 2.0, 3.0])


# -- end to end ----------------------------------------------------------------------------


def test_merge_stacks_slices_with_scales(llama_models, merge):
    a, b, _ = llama_models
    out = merge({
        "merge_method": "passthrough",
        "slices": [
            # 2 layers from a; scale gradient 1 -> 3 over the slice (layer 0: 1, layer 1: 3)
            {"sources": [{"model": str(a), "layer_range": [0, 2],
                          "parameters": {"scale": [1.0, 3.0]}}]},
            # 3 layers from b; mlp doubled
            {"sources": [{"model": str(b), "layer_range": [1, 4],
                          "parameters": {"scale": [{"filter": "mlp", "value": 2.0},
                                                   {"value": 1.0}]}}]},
        ],
    })
    A, B, M = load_state(a), load_state(b), load_state(out)
    layer_names = sorted({n.split(".", 3)[3] for n in A if n.startswith("model.layers.")})
    assert len([n for n in M if n.startswith("model.layers.")]) == 5 * len(layer_names)
    for suffix in layer_names:
        # output layers 0, 1 <- a's 0, 1 (scales 1, 3); output 2, 3, 4 <- b's 1, 2, 3
        for k, (src, layer, scale) in enumerate([
            (A, 0, 1.0), (A, 1, 3.0), (B, 1, 1.0), (B, 2, 1.0), (B, 3, 1.0),
        ]):
            if src is B and suffix.startswith("mlp."):
                scale = 2.0
            expected = src[f"model.layers.{layer}.{suffix}"].numpy() * scale
            np.testing.assert_allclose(M[f"model.layers.{k}.{suffix}"].numpy(), expected,
                                       rtol=0, atol=1e-6, err_msg=f"{k}.{suffix}")
    # embeddings from the first slice (t = 0 of its gradient), head and norm from the last
    np.testing.assert_array_equal(M["model.embed_tokens.weight"], A["model.embed_tokens.weight"])
    np.testing.assert_array_equal(M["lm_head.weight"], B["lm_head.weight"])
    np.testing.assert_array_equal(M["model.norm.weight"], B["model.norm.weight"])


@pytest.mark.parametrize("dtype", [None, "bfloat16", "float16"])
def test_unscaled_tensors_are_copied_exactly(llama_models, merge, dtype):
    """Scale 1 copies the input's bits (converted to the output dtype only if asked),
    as a plain torch conversion of the input gives."""
    a = llama_models[0]
    recipe = {"merge_method": "passthrough",
              "slices": [{"sources": [{"model": str(a), "layer_range": [0, 4]}]}]}
    if dtype:
        recipe["dtype"] = dtype
    A, M = load_state(a), load_state(merge(recipe))
    assert set(M) == set(A)
    for name, t in A.items():
        expected = t if dtype is None else t.to(getattr(torch, dtype))
        assert M[name].dtype == expected.dtype and torch.equal(M[name], expected), name
