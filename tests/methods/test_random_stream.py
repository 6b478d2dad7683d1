"""Position-addressed draws: element i of a stream depends only on (seed, stream, i)."""

from __future__ import annotations

import pytest
import torch

from mergekit.methods.random_stream import BLOCK, _block_seed, uniform


def reference(numel: int, seed: int, stream: int, offset: int) -> torch.Tensor:
    """One element at a time: draw its whole block from a generator seeded for that block
    and pick the element's place in it."""
    out = torch.empty(numel)
    cache: dict[int, torch.Tensor] = {}
    for i in range(numel):
        block, place = divmod(offset + i, BLOCK)
        if block not in cache:
            gen = torch.Generator().manual_seed(_block_seed(seed, stream, block))
            cache[block] = torch.rand(BLOCK, generator=gen)
        out[i] = cache[block][place]
    return out


@pytest.mark.parametrize("numel, offset", [
    (1, 0), (BLOCK, 0), (BLOCK + 1, 0), (3 * BLOCK + 17, 5), (2 * BLOCK, BLOCK - 1),
    (9 * BLOCK, 4 * BLOCK),  # whole blocks over several threads
])
def test_draws_match_the_block_by_block_definition(numel, offset):
    got = uniform(numel, 1234, 2, offset)
    assert got.dtype == torch.float32 and got.shape == (numel,)
    assert torch.equal(got, reference(numel, 1234, 2, offset))


def test_any_split_gives_the_same_draws():
    whole = uniform(5 * BLOCK + 321, 7, 0, 99)
    cuts = [0, 1, BLOCK - 98, 2 * BLOCK + 5, 5 * BLOCK + 321]
    parts = [uniform(b - a, 7, 0, 99 + a) for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat(parts), whole)


def test_streams_and_seeds_differ_and_stay_in_range():
    a, b, c = uniform(BLOCK, 1, 0, 0), uniform(BLOCK, 1, 1, 0), uniform(BLOCK, 2, 0, 0)
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) < 1.0
    assert uniform(0, 1, 0, 0).shape == (0,)
