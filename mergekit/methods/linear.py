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
          arrays=True)
def linear(tensors: list[torch.Tensor], base: torch.Tensor | None, params: LinearParams):
    """Linear (weighted average)

    https://arxiv.org/abs/2203.05482
    """
    import numpy as np

    # the weights and their sum as float32 values, as the math is done in
    weights = np.array(params.weight, dtype=np.float32)
    # each product rounded, then added (no fused multiply-add): the same bits from torch and
    # numpy inputs
    out = tensors[0] * weights[0].item()
    for wi, x in zip(weights[1:].tolist(), tensors[1:]):
        out += x * wi
    total = weights.sum(dtype=np.float32).item()
    if params.normalize and total not in (0.0, 1.0):  # dividing by 1 changes no bit
        out /= total
    return out
