from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from pydantic import Field

from mergekit.methods.gram import summed_gram
from mergekit.methods.registry import MethodParams, prepared, register
from mergekit.methods.task_vectors import sum_in_order

if TYPE_CHECKING:
    import torch

EPS = 1e-8


class ModelStockParams(MethodParams):
    filter_wise: bool = Field(
        False, description="compute the interpolation ratio per row instead of per tensor"
    )
    # Set by prepare_model_stock (one ratio per tensor): the interpolation ratio from the
    # whole tensor's task vectors, so row chunks merge as the whole tensor would.
    ratio: float | None = prepared()


def mean_pairwise_cosine(deltas: torch.Tensor) -> torch.Tensor:
    """Mean cosine over all pairs. ``deltas``: (n_models, n_vectors, dim) -> (n_vectors,)."""
    import torch

    norms = torch.linalg.vector_norm(deltas, dim=-1, keepdim=True).clamp_min(EPS)
    unit = deltas / norms
    n = deltas.shape[0]
    total = torch.zeros(deltas.shape[1], dtype=deltas.dtype, device=deltas.device)
    for i in range(n):
        for j in range(i + 1, n):
            total += (unit[i] * unit[j]).sum(dim=-1)
    return total / (n * (n - 1) / 2)


def _per_row(params: ModelStockParams, base: torch.Tensor) -> bool:
    return params.filter_wise and base.ndim >= 2


def prepare_model_stock(
    chunks: Callable[[], Iterable[tuple[list[torch.Tensor], torch.Tensor]]],
    params: ModelStockParams,
) -> ModelStockParams:
    """The ratio of a whole tensor (unless filter-wise) from the Gram matrix of its task
    vectors (see ``summed_gram``)."""
    _, base, *_ = next(iter(chunks()))
    if _per_row(params, base):  # row-local: nothing to gather
        return params
    gram = summed_gram(chunks(), deltas=True)
    n = gram.shape[0]
    norms = [max(math.sqrt(float(gram[i, i])), EPS) for i in range(n)]
    pairs = [float(gram[i, j]) / (norms[i] * norms[j]) for i in range(n) for j in range(i + 1, n)]
    cos = sum(pairs) / len(pairs)
    denom = 1 + (n - 1) * cos
    # cos = -1/(n-1) only when the deltas cancel exactly; fall back to the base there
    return params.model_copy(update={"ratio": n * cos / denom if abs(denom) > EPS else 0.0})


@register("model_stock", ModelStockParams, base="required", min_models=2, elementwise=True,
          prepare=prepare_model_stock, arrays=lambda params: not params.filter_wise)
def model_stock(tensors: list[torch.Tensor], base: torch.Tensor | None,
                params: ModelStockParams):
    """Model Stock

    https://arxiv.org/abs/2403.19522
    """
    assert base is not None
    n = len(tensors)
    mean = sum_in_order(tensors)
    mean /= n  # the bits of torch's mean, faster
    if _per_row(params, base):
        import torch

        stacked = torch.stack(tensors)  # (n_models, *shape)
        cos = mean_pairwise_cosine((stacked - base).reshape(n, base.shape[0], -1))  # (rows,)
        denom = 1 + (n - 1) * cos
        t = torch.where(denom.abs() > EPS, n * cos / denom.where(denom.abs() > EPS, 1.0), 0.0)
        t = t.reshape(-1, *([1] * (base.dim() - 1)))
        return t * mean + (1 - t) * base
    if params.ratio is None:
        params = prepare_model_stock(lambda: [(tensors, base)], params)
    t = params.ratio
    mean *= t
    mean += base * (1 - t)
    return mean
