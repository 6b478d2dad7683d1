"""Dot products of whole tensors gathered over row chunks, for the methods that need a
tensor's norms or angles before they can merge its chunks (slerp, nuslerp, multislerp,
model_stock, karcher)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, TypeVar

from mergekit.methods.registry import MethodParams, prepared

if TYPE_CHECKING:
    import numpy as np
    import torch


def row_dots(vectors: Sequence[torch.Tensor]) -> np.ndarray:
    """The (n, n, rows) float64 dot products, row by row, of ``vectors`` (tensors or numpy
    arrays of one shape, or the same row chunk of several tensors; a 1-D tensor is one
    row), each computed in float32 (a few thousand terms: relative error about 1e-6; several
    times faster than float64 products). In host memory numpy computes them, for torch tensors
    as for arrays (the same bits); on a GPU, torch."""
    import numpy as np

    shape = vectors[0].shape
    n_rows = shape[0] if len(shape) > 1 else 1
    n_cols = math.prod(shape) // n_rows if n_rows else 0  # not -1: empty tensors too
    rows = [v.reshape(n_rows, n_cols) for v in vectors]
    on_device = not isinstance(rows[0], np.ndarray) and rows[0].device.type != "cpu"
    if not on_device:
        rows = [np.asarray(r) for r in rows]  # a torch tensor's memory, not a copy
    n = len(rows)
    dots = np.zeros((n, n, rows[0].shape[0]), dtype=np.float64)
    for i in range(n):
        for j in range(i, n):
            if on_device:
                import torch

                dots[i, j] = torch.linalg.vecdot(rows[i], rows[j]).cpu().numpy()
            else:
                with np.errstate(all="ignore"):  # Inf - Inf is NaN, as in torch
                    dots[i, j] = _vecdot(rows[i], rows[j])
            dots[j, i] = dots[i, j]
    return dots


def _vecdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row float32 dot products: numpy's vecdot (numpy 2), or einsum on numpy 1.x
    (rounding differently: outputs can differ in the last bit between the two)."""
    import numpy as np

    if hasattr(np, "vecdot"):
        return np.vecdot(a, b)
    return np.einsum("ij,ij->i", a, b)


def summed_gram(chunks: Iterable[tuple[list[torch.Tensor], torch.Tensor | None]],
                deltas: bool) -> np.ndarray:
    """The Gram matrix of a whole tensor's inputs (their differences from the base when
    ``deltas`` and a base is given) from its row chunks: every row's ``row_dots``, summed
    at the end, so the sum does not depend on how the rows were chunked."""
    import numpy as np

    dots = None  # (n, n, capacity): the rows' dot products so far, in one growing buffer
    used = 0
    for xs, base, *_ in chunks:
        chunk = row_dots([x - base for x in xs] if deltas and base is not None else xs)
        rows = chunk.shape[2]
        if dots is None or used + rows > dots.shape[2]:
            # one buffer that doubles, not an array per chunk: small arrays left between a
            # job's large ones keep the heap from returning memory
            grown = np.empty((*chunk.shape[:2], 2 * (used + rows)), dtype=np.float64)
            if dots is not None:
                grown[:, :, :used] = dots[:, :, :used]
            dots = grown
        dots[:, :, used:used + rows] = chunk
        used += rows
    assert dots is not None, "a tensor has at least one chunk"
    with np.errstate(all="ignore"):  # sums holding Inf or NaN give them, as in torch
        return dots[:, :, :used].sum(axis=2)


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
