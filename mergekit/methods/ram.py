"""RAM and RAM+: unique task-vector entries are added as they are, shared ones averaged."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mergekit.methods.registry import MethodParams, register

if TYPE_CHECKING:
    import torch


class RamParams(MethodParams):
    epsilon: float = Field(1e-5, description="task-vector entries above this magnitude are "
                           "active")


class RamPlusParams(RamParams):
    r: float = Field(0.1, description="strength of the boost of each model's unique entries")
    alpha: float = Field(0.2, description="cap on the overlap ratio that drives the boost")


def _active(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float):
    import torch

    deltas = torch.stack([x - base for x in tensors])  # (n_models, *shape)
    active = deltas.abs() > epsilon
    count = active.sum(dim=0)  # models active at each position
    return deltas * active, active, count


@register("ram", RamParams, base="required", shape_policy="base", elementwise=True)
def ram(tensors: list[torch.Tensor], base: torch.Tensor | None, params: RamParams):
    """RAM (reinforced agent merging)"""
    assert base is not None
    deltas, _, count = _active(tensors, base, params.epsilon)
    return base + deltas.sum(dim=0) / count.clamp_min(1)


@register("ramplus_tl", RamPlusParams, base="required", shape_policy="base")
def ramplus_tl(tensors: list[torch.Tensor], base: torch.Tensor | None,
               params: RamPlusParams):
    """RAM+ (reinforced agent merging, with unique-entry rescaling)"""
    import torch

    assert base is not None
    deltas, active, count = _active(tensors, base, params.epsilon)
    shared = active & (count > 1)
    unique = active & (count == 1)
    n = len(tensors)
    flat_shared = shared.reshape(n, -1).sum(dim=1).to(base.dtype)
    flat_unique = unique.reshape(n, -1).sum(dim=1).to(base.dtype)
    # overlap ratio of each model: its shared entries per unique entry (0 with none unique)
    ratio = torch.where(flat_unique > 0, flat_shared / flat_unique.clamp_min(1), 0.0)
    boost = 1.0 + params.r * ratio.clamp(0.0, params.alpha)  # (n_models,)
    boost = boost.reshape(-1, *([1] * base.dim()))
    unique_part = (deltas * unique * boost).sum(dim=0)
    shared_part = (deltas * shared).sum(dim=0) / count.clamp_min(1)
    return base + unique_part + torch.where(count > 1, shared_part, 0.0)
