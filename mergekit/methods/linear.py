from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mergekit.methods.registry import MethodParams, PerModelFloat, register

if TYPE_CHECKING:
    import torch


class LinearParams(MethodParams):
    weight: PerModelFloat = Field(description="weight of this model in the sum")
    normalize: bool = Field(True, description="divide by the sum of the weights")


@register("linear", LinearParams, base="unused", elementwise=True, keeps_nonfinite=True,
          stored_dtype_inputs=True)
def linear(tensors: list[torch.Tensor], base: torch.Tensor | None, params: LinearParams):
    """Linear (weighted average)

    https://arxiv.org/abs/2203.05482
    """
    import torch

    # the weights as float32 values, as the math is done in
    weights = torch.tensor(params.weight, dtype=torch.float32)
    w = weights.tolist()
    # the first input times its weight as a new float32 tensor, then accumulate in place:
    # no temporaries, and the other inputs (in their stored dtype) are read as float32
    first = tensors[0]
    out = first * w[0] if first.dtype == torch.float32 else first.to(torch.float32).mul_(w[0])
    for wi, x in zip(w[1:], tensors[1:]):
        out.add_(x, alpha=wi)
    total = float(weights.sum())
    if params.normalize and total not in (0.0, 1.0):  # dividing by 1 changes no bit
        out.div_(total)
    return out
