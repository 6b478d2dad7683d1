from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mergekit.methods.registry import MethodParams, PerModelFloat, register
from mergekit.methods.spherical import chord_mean, exp_map, log_map, unit_and_norms

if TYPE_CHECKING:
    import torch


class MultiSlerpParams(MethodParams):
    weight: PerModelFloat = Field(1.0, description="weight of this model in the mean")
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, description="norms below this count as zero")


@register("multislerp", MultiSlerpParams, base="optional", min_models=1)
def multislerp(tensors: list[torch.Tensor], base: torch.Tensor | None,
               params: MultiSlerpParams):
    """Multi-SLERP (weighted spherical mean of several models)"""
    import torch

    shape = tensors[0].shape
    vectors = torch.stack([x.reshape(-1) for x in tensors])  # (n_models, numel)
    if base is not None:
        vectors = vectors - base.reshape(-1)
    weights = torch.tensor(params.weight, dtype=vectors.dtype, device=vectors.device)
    if params.normalize_weights:
        total = float(weights.sum())
        weights = weights / (total if total != 0 else 1.0)
    unit, norms = unit_and_norms(vectors, params.eps)
    mean = chord_mean(unit, weights, params.eps)
    tangent = (weights.unsqueeze(-1) * log_map(mean, unit, params.eps)).sum(dim=0)
    direction = exp_map(mean, tangent, params.eps)
    out = (direction * (weights * norms).sum()).reshape(shape)
    return out + base if base is not None else out
