from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from pydantic import Field

from mergekit.methods.gram import row_gram
from mergekit.methods.registry import MethodParams, PerModelFloat, register
from mergekit.methods.slerp import slerp_coefficients

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
    # Set by prepare_nuslerp for a tensor treated as one vector: (|a|^2, |b|^2, a . b) of
    # the whole tensor, so row chunks are interpolated with the whole tensor's angle.
    sums: tuple[float, float, float] | None = Field(
        None, description="internal", json_schema_extra={"internal": True})


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


def _task_vectors(tensors: list[torch.Tensor], base: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = tensors
    return (a - base, b - base) if base is not None else (a, b)


def _one_vector(params: NuSlerpParams, a: torch.Tensor) -> bool:
    return params.nuslerp_flatten or a.dim() < 2


def prepare_nuslerp(
    chunks: Callable[[], Iterable[tuple[list[torch.Tensor], torch.Tensor | None]]],
    params: NuSlerpParams,
) -> NuSlerpParams:
    """For a tensor treated as one vector: (|a|^2, |b|^2, a . b) summed over row chunks
    (see ``row_gram``). Rows are interpolated on their own and need nothing."""
    import torch

    total = torch.zeros(3, dtype=torch.float64)
    for xs, base, *_ in chunks():
        a, b = _task_vectors(xs, base)
        if not _one_vector(params, a):
            return params
        gram = row_gram([a, b])
        total += torch.stack([gram[0, 0], gram[1, 1], gram[0, 1]])
    return params.model_copy(update={"sums": tuple(total.tolist())})


@register("nuslerp", NuSlerpParams, base="optional", min_models=2, max_models=2,
          elementwise=lambda p: p.nuslerp_flatten or not p.nuslerp_row_wise,
          prepare=prepare_nuslerp)
def nuslerp(tensors: list[torch.Tensor], base: torch.Tensor | None, params: NuSlerpParams):
    """NuSLERP (slerp by weights, of task vectors when a base is given)"""
    import torch

    w1, w2 = params.weight
    total = w1 + w2
    t = w2 / total if total != 0 else 0.5
    a, b = _task_vectors(tensors, base)
    shape = a.shape
    if _one_vector(params, a):
        if params.sums is None:
            params = prepare_nuslerp(lambda: [(tensors, base)], params)
        assert params.sums is not None
        s_a, s_b = slerp_coefficients(params.sums, t) or (1.0 - t, t)
        out = torch.mul(a, s_a).add_(b, alpha=s_b)
    elif not params.nuslerp_row_wise:  # rows W[i, :]
        out = slerp_rows(a.reshape(shape[0], -1), b.reshape(shape[0], -1), t).reshape(shape)
    else:  # columns W[:, j]: vectors along the first dimension
        cols_a = torch.movedim(a, 0, -1).reshape(-1, shape[0])
        cols_b = torch.movedim(b, 0, -1).reshape(-1, shape[0])
        moved = torch.movedim(a, 0, -1).shape
        out = torch.movedim(slerp_rows(cols_a, cols_b, t).reshape(moved), -1, 0)
    return out + base if base is not None else out
