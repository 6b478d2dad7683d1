"""Helpers shared by the task-vector methods."""

from __future__ import annotations

import pytest
import torch

from mergekit.methods.task_vectors import sum_in_order


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_sum_in_order_gives_the_bits_of_a_stacked_sum_and_mean(n: int):
    """Methods replace torch's sum and mean over a stacked models' dimension by it and keep
    their output bytes; here against float64 sums rounded once, too."""
    gen = torch.Generator().manual_seed(n)
    # magnitudes over many octaves, so that sums in another order would round differently
    xs = [torch.randn(4096, generator=gen) * 2.0 ** torch.randint(-20, 20, (4096,),
                                                                 generator=gen)
          for _ in range(n)]
    total = sum_in_order(xs)
    assert torch.equal(total, torch.stack(xs).sum(dim=0))
    assert torch.equal(total / n, torch.stack(xs).mean(dim=0))
    # each step rounds in float32: the result is the float32 left-to-right sum
    expected = xs[0].clone()
    for x in xs[1:]:
        expected = (expected.double() + x.double()).float()
    assert torch.equal(total, expected)


def test_sum_in_order_of_one_tensor_is_a_copy():
    x = torch.ones(3)
    total = sum_in_order([x])
    total += 1
    assert torch.equal(x, torch.ones(3))


def test_sum_in_order_takes_a_generator():
    assert torch.equal(sum_in_order(torch.full((2,), float(i)) for i in range(4)),
                       torch.full((2,), 6.0))
