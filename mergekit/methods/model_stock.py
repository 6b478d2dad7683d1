from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mergekit.methods.registry import MethodParams, register

if TYPE_CHECKING:
    import torch

EPS = 1e-8


class ModelStockParams(MethodParams):
    filter_wise: bool = Field(
        False, description="compute the interpolation ratio per row instead of per tensor"
    )


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


@register("model_stock", ModelStockParams, base="required", min_models=2)
def model_stock(tensors: list[torch.Tensor], base: torch.Tensor | None,
                params: ModelStockParams):
    """Model Stock

    https://arxiv.org/abs/2403.19522
    """
    import torch

    assert base is not None
    n = len(tensors)
    stacked = torch.stack(tensors)  # (n_models, *shape)
    deltas = stacked - base
    if params.filter_wise and base.dim() >= 2:
        vectors = deltas.reshape(n, base.shape[0], -1)  # (n_models, rows, row_len)
    else:
        vectors = deltas.reshape(n, 1, -1)
    cos = mean_pairwise_cosine(vectors)  # (rows,) or (1,)
    denom = 1 + (n - 1) * cos
    # cos = -1/(n-1) only when the deltas cancel exactly; fall back to the base there
    t = torch.where(denom.abs() > EPS, n * cos / denom.where(denom.abs() > EPS, 1.0), 0.0)
    t = t.reshape(-1, *([1] * (base.dim() - 1))) if vectors.shape[1] > 1 else t.reshape(())
    return t * stacked.mean(dim=0) + (1 - t) * base
