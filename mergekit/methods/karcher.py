from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mergekit.methods.registry import MethodParams, PerModelFloat, register
from mergekit.methods.spherical import EPS, chord_mean, exp_map, log_map, unit_and_norms

if TYPE_CHECKING:
    import torch


class KarcherParams(MethodParams):
    weight: PerModelFloat = Field(1.0, description="weight of this model in the mean")
    max_iter: int = Field(10, description="most iterations of the mean's fixed point")
    tol: float = Field(1e-5, description="stop when the tangent step is shorter than this")


@register("karcher", KarcherParams, base="unused", min_models=1)
def karcher(tensors: list[torch.Tensor], base: torch.Tensor | None, params: KarcherParams):
    """Karcher mean (Riemannian mean on the sphere)

    https://en.wikipedia.org/wiki/Karcher_mean
    """
    import torch

    shape = tensors[0].shape
    vectors = torch.stack([x.reshape(-1) for x in tensors])  # (n_models, numel)
    weights = torch.tensor(params.weight, dtype=vectors.dtype, device=vectors.device)
    total = float(weights.sum())
    weights = weights / (total if total != 0 else 1.0)
    unit, norms = unit_and_norms(vectors, EPS)
    live = norms > EPS
    if not bool(live.any()):
        return torch.zeros(shape, dtype=vectors.dtype, device=vectors.device)
    mean = chord_mean(unit[live], weights[live], EPS)
    for _ in range(params.max_iter):
        tangent = (weights[live].unsqueeze(-1) * log_map(mean, unit[live], EPS)).sum(dim=0)
        tangent = tangent / weights[live].sum().clamp_min(EPS)
        mean = exp_map(mean, tangent, EPS)
        if float(torch.linalg.vector_norm(tangent)) < params.tol:
            break
    return (mean * (weights * norms).sum()).reshape(shape)
