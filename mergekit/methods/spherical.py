"""Steps shared by the spherical means (multislerp, karcher): log and exp maps on the
unit sphere of flattened tensors."""

from __future__ import annotations

from typing import TYPE_CHECKING

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
