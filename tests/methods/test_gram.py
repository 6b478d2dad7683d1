"""Whole-tensor Gram matrices from row chunks (gram.py): close to a float64 evaluation, the
same bits from tensors and numpy arrays and for any chunking, and without numpy's vecdot."""

import numpy as np
import pytest
import torch

from mergekit.methods.gram import summed_gram


def vectors(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(300, 70, generator=g)
    return [base + 0.1 * torch.randn(300, 70, generator=g) for _ in range(3)]


def row_gram(xs: list) -> np.ndarray:
    """The Gram matrix of whole tensors (one chunk each)."""
    return summed_gram([(xs, None)], deltas=False)


def float64_gram(xs: list[torch.Tensor]) -> np.ndarray:
    flat = torch.stack([x.double().reshape(-1) for x in xs])
    return (flat @ flat.T).numpy()


@pytest.mark.parametrize("vecdot", [True, False], ids=["vecdot", "einsum"])
def test_row_gram_is_close_to_float64(vecdot, monkeypatch):
    if not vecdot:  # numpy 1.x has no vecdot
        monkeypatch.delattr(np, "vecdot", raising=False)
    xs = vectors()
    got = row_gram(xs)
    assert got.dtype == np.float64 and got.shape == (3, 3)
    np.testing.assert_allclose(got, float64_gram(xs), rtol=1e-6)
    assert np.array_equal(got, got.T)


def test_arrays_and_tensors_give_the_same_bits():
    xs = vectors(1)
    assert np.array_equal(row_gram(xs), row_gram([x.numpy().copy() for x in xs]))


@pytest.mark.parametrize("step", [1, 7, 64, 299])
def test_summed_gram_does_not_depend_on_the_chunking(step):
    xs = vectors(2)
    base = xs[0] * 0.5
    whole = summed_gram([(xs, base)], deltas=True)
    chunks = [([x[i:i + step] for x in xs], base[i:i + step]) for i in range(0, 300, step)]
    assert np.array_equal(summed_gram(chunks, deltas=True), whole)
    np.testing.assert_allclose(whole, float64_gram([x - base for x in xs]), rtol=1e-6)
