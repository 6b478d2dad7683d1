"""Dot products of whole tensors gathered over row chunks, for the methods that need a
tensor's norms or angles before they can merge its chunks (slerp, nuslerp, multislerp,
model_stock, karcher)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, TypeVar

from mergekit.methods.registry import MethodParams, prepared

if TYPE_CHECKING:
    import torch


def row_gram(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The (n, n) float64 Gram matrix of ``vectors`` (tensors of one shape, or the same row
    chunk of several tensors), on the CPU: dot products per row in float32 (a few thousand
    terms each; relative error about 1e-6), summed over rows in float64. Chunks hold whole
    rows, so summing the matrices of a tensor's chunks does not depend on the chunking,
    and it is 4x faster than float64 products."""
    import torch

    shape = vectors[0].shape
    rows = [v.reshape(shape[0] if len(shape) > 1 else 1, -1) for v in vectors]
    n = len(rows)
    gram = torch.zeros((n, n), dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            gram[i, j] = gram[j, i] = torch.linalg.vecdot(rows[i], rows[j]).sum(
                dtype=torch.float64).cpu()
    return gram


def summed_gram(chunks: Iterable[tuple[list[torch.Tensor], torch.Tensor | None]],
                deltas: bool) -> torch.Tensor:
    """``row_gram`` of a whole tensor's inputs (their differences from the base when
    ``deltas`` and a base is given) summed over its row chunks."""
    gram = None
    for xs, base, *_ in chunks:
        vectors = [x - base for x in xs] if deltas and base is not None else xs
        chunk = row_gram(vectors)
        gram = chunk if gram is None else gram + chunk
    assert gram is not None, "a tensor has at least one chunk"
    return gram


class GramParams(MethodParams):
    """Parameters of a method that merges from its vectors' Gram matrix: set by the prepare
    pass from ``gram_prepare``, so row chunks merge as the whole tensor would."""

    gram: tuple[float, ...] | None = prepared()  # row-major

    def gram_rows(self) -> list[list[float]]:
        assert self.gram is not None
        n = math.isqrt(len(self.gram))
        return [list(self.gram[i * n:(i + 1) * n]) for i in range(n)]


P = TypeVar("P", bound=GramParams)


def gram_prepare(deltas: bool) -> Callable[[Callable[[], Iterable], P], P]:
    """A prepare function setting ``gram`` to ``summed_gram`` of the chunks."""

    def prepare(chunks: Callable[[], Iterable], params: P) -> P:
        gram = summed_gram(chunks(), deltas)
        return params.model_copy(update={"gram": tuple(gram.reshape(-1).tolist())})

    return prepare
