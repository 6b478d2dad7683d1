from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mergekit.methods.registry import MethodParams, register

if TYPE_CHECKING:
    import torch


class NearswapParams(MethodParams):
    t: float = Field(description="similarity threshold: entries closer than t take the other "
                     "model's value")


@register("nearswap", NearswapParams, base="required", min_models=1, max_models=1,
          elementwise=True)
def nearswap(tensors: list[torch.Tensor], base: torch.Tensor | None, params: NearswapParams):
    """NearSwap (interpolate where the models are close)"""
    import torch

    assert base is not None
    (other,) = tensors
    distance = (base - other).abs()
    # weight = clamp(t / |a - b|, 0, 1); where a == b either choice gives the same value
    weight = torch.where(
        distance > 0, params.t / distance.clamp_min(torch.finfo(distance.dtype).tiny), 1.0
    ).clamp(0.0, 1.0)
    return weight * other + (1.0 - weight) * base
