from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mergekit.methods.registry import MethodParams, PerModelFloat, register

if TYPE_CHECKING:
    import torch


class LinearParams(MethodParams):
    weight: PerModelFloat = Field(description="weight of this model in the sum")
    normalize: bool = Field(True, description="divide by the sum of the weights")


@register("linear", LinearParams, base="unused", elementwise=True)
def linear(tensors: list[torch.Tensor], base: torch.Tensor | None, params: LinearParams):
    """Linear (weighted average)

    https://arxiv.org/abs/2203.05482
    """
    import torch

    weights = torch.tensor(params.weight, dtype=tensors[0].dtype, device=tensors[0].device)
    out = torch.zeros_like(tensors[0])
    for w, x in zip(weights, tensors):
        out.add_(x, alpha=float(w))
    if params.normalize:
        total = float(weights.sum())
        out.div_(total if total != 0 else 1.0)
    return out
