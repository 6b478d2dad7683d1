from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mergekit.methods.registry import MethodParams, PerModelFloat, register

if TYPE_CHECKING:
    import torch

COLINEAR_COSINE = 0.9995
EPS = 1e-8


class NuSlerpParams(MethodParams):
    weight: PerModelFloat = Field(description="relative weight; t = w2 / (w1 + w2)")
    nuslerp_flatten: bool = Field(True, description="treat each tensor as one vector")
    nuslerp_row_wise: bool = Field(
        False, description="when not flattening: false interpolates each row W[i, :], "
        "true each column W[:, j] (the established tool's convention)"
    )


def slerp_rows(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Slerp between matching rows of ``a`` and ``b`` (shape (n_vectors, dim))."""
    import torch

    norm_a = torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    norm_b = torch.linalg.vector_norm(b, dim=-1, keepdim=True)
    unit_a = a / torch.where(norm_a > EPS, norm_a, 1.0)
    unit_b = b / torch.where(norm_b > EPS, norm_b, 1.0)
    cos = (unit_a * unit_b).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin_theta = torch.sin(theta)
    colinear = cos.abs() > COLINEAR_COSINE
    safe_sin = torch.where(colinear, 1.0, sin_theta)
    s_a = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / safe_sin)
    s_b = torch.where(colinear, t, torch.sin(t * theta) / safe_sin)
    return s_a * a + s_b * b


@register("nuslerp", NuSlerpParams, base="optional", min_models=2, max_models=2)
def nuslerp(tensors: list[torch.Tensor], base: torch.Tensor | None, params: NuSlerpParams):
    """NuSLERP (slerp by weights, of task vectors when a base is given)"""
    import torch

    w1, w2 = params.weight
    total = w1 + w2
    t = w2 / total if total != 0 else 0.5
    a, b = tensors
    if base is not None:
        a, b = a - base, b - base
    shape = a.shape
    if params.nuslerp_flatten or a.dim() < 2:
        out = slerp_rows(a.reshape(1, -1), b.reshape(1, -1), t).reshape(shape)
    elif not params.nuslerp_row_wise:  # rows W[i, :]
        out = slerp_rows(a.reshape(shape[0], -1), b.reshape(shape[0], -1), t).reshape(shape)
    else:  # columns W[:, j]: vectors along the first dimension
        cols_a = torch.movedim(a, 0, -1).reshape(-1, shape[0])
        cols_b = torch.movedim(b, 0, -1).reshape(-1, shape[0])
        moved = torch.movedim(a, 0, -1).shape
        out = torch.movedim(slerp_rows(cols_a, cols_b, t).reshape(moved), -1, 0)
    return out + base if base is not None else out
