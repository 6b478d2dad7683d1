from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mergekit.methods.registry import MethodParams, PerModelFloat, register

if TYPE_CHECKING:
    import torch


class MultiSlerpParams(MethodParams):
    weight: PerModelFloat = Field(1.0, description="weight of this model in the mean")
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, description="guards the divisions by norms")


@register("multislerp", MultiSlerpParams, base="optional", min_models=1)
def multislerp(tensors: list[torch.Tensor], base: torch.Tensor | None,
               params: MultiSlerpParams):
    """Multi-SLERP (weighted spherical mean of several models)

    Unit vectors u_i = x_i / (|x_i| + eps) of the inputs (task vectors when a base is
    given); m = normalised sum of w_i u_i; tangent = sum of w_i (u_i - (u_i . m) m); one
    exponential step from m along it; scaled by the weighted mean norm.
    """
    import torch

    if len(tensors) == 1:
        return tensors[0]
    eps = params.eps
    shape = tensors[0].shape
    vectors = torch.stack([x.reshape(-1) for x in tensors])  # (n_models, numel)
    if base is not None:
        vectors = vectors - base.reshape(-1)
    weights = torch.tensor(params.weight, dtype=vectors.dtype, device=vectors.device)
    if params.normalize_weights:
        total = float(weights.sum())
        weights = weights / (total if total != 0 else 1.0)
    norms = torch.linalg.vector_norm(vectors, dim=-1)  # (n_models,)
    unit = vectors / (norms.unsqueeze(-1) + eps)
    mean = (weights.unsqueeze(-1) * unit).sum(dim=0)
    mean_norm = float(torch.linalg.vector_norm(mean))
    if mean_norm < eps:  # the directions cancel: no sphere point to start from
        out = (weights.unsqueeze(-1) * vectors).sum(dim=0).reshape(shape)
        return out + base if base is not None else out
    mean = mean / mean_norm
    tangent = (weights.unsqueeze(-1) * (unit - (unit @ mean).unsqueeze(-1) * mean)).sum(dim=0)
    length = torch.linalg.vector_norm(tangent) + eps
    direction = torch.cos(length) * mean + torch.sin(length) * tangent / length
    out = (direction * (weights * norms).sum()).reshape(shape)
    return out + base if base is not None else out
