from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mergekit.methods.registry import MethodParams, PerModelFloat, register

if TYPE_CHECKING:
    import torch


EPS = 1e-8


def unit_and_norms(vectors: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, dim) -> unit vectors (zero vectors stay zero) and norms (n,)."""
    import torch

    norms = torch.linalg.vector_norm(vectors, dim=-1)
    unit = vectors / torch.where(norms > eps, norms, 1.0).unsqueeze(-1)
    return unit, norms


def log_map(at: torch.Tensor, points: torch.Tensor, eps: float) -> torch.Tensor:
    """Tangent vectors at unit ``at`` (dim,) pointing to unit ``points`` (n, dim)."""
    import torch

    cos = (points @ at).clamp(-1.0, 1.0)  # (n,)
    theta = torch.arccos(cos)
    ortho = points - cos.unsqueeze(-1) * at
    sin = torch.sin(theta)
    scale = torch.where(sin > eps, theta / torch.where(sin > eps, sin, 1.0), 1.0)
    return ortho * scale.unsqueeze(-1)


def exp_map(at: torch.Tensor, tangent: torch.Tensor, eps: float) -> torch.Tensor:
    """The unit vector reached from ``at`` along ``tangent`` (both (dim,))."""
    import torch

    length = torch.linalg.vector_norm(tangent)
    if float(length) <= eps:
        return at
    return torch.cos(length) * at + torch.sin(length) * tangent / length


def chord_mean(unit: torch.Tensor, weights: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalised weighted sum of unit vectors; the first vector if it vanishes."""
    import torch

    mean = (weights.unsqueeze(-1) * unit).sum(dim=0)
    length = torch.linalg.vector_norm(mean)
    return mean / length if float(length) > eps else unit[0]


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
        if float(torch.linalg.vector_norm(tangent)) < params.tol:
            break
        mean = exp_map(mean, tangent, EPS)
        mean = mean / torch.linalg.vector_norm(mean).clamp_min(EPS)
    return (mean * (weights * norms).sum()).reshape(shape)
