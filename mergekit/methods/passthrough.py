from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mergekit.methods.registry import MethodParams, PerModelFloat, register

if TYPE_CHECKING:
    import torch


class PassthroughParams(MethodParams):
    scale: PerModelFloat = Field(1.0, description="multiply the tensor by this factor")


@register("passthrough", PassthroughParams, base="unused", max_models=1, elementwise=True,
          copies=lambda params: params.scale == (1.0,), keeps_nonfinite=True,
          arrays=True)
def passthrough(
    tensors: list[torch.Tensor], base: torch.Tensor | None, params: PassthroughParams
):
    """Passthrough (copy one source per tensor)"""
    (x,) = tensors
    (scale,) = params.scale
    return x if scale == 1.0 else x * scale
