"""RAM and RAM+: unique task-vector entries are added as they are, shared ones averaged."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from pydantic import Field

from mergekit.methods.registry import MethodParams, prepared, register
from mergekit.methods.task_vectors import sum_in_order

if TYPE_CHECKING:
    import torch


class RamParams(MethodParams):
    epsilon: float = Field(1e-5, description="task-vector entries above this magnitude are "
                           "active")


class RamPlusParams(RamParams):
    r: float = Field(0.1, description="strength of the boost of each model's unique entries")
    alpha: float = Field(0.2, description="cap on the overlap ratio that drives the boost")
    # Set by prepare_ramplus: each model's boost, from counts over the whole tensor, so row
    # chunks merge as the whole tensor would.
    boost: tuple[float, ...] | None = prepared()


def _active(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float):
    """Per model, its task vector where it is active (|delta| > epsilon, else 0) and where
    it is; and how many models are active at each position (float32)."""
    import torch

    deltas = [x - base for x in tensors]
    active = [d.abs() > epsilon for d in deltas]
    count = sum_in_order([a.to(torch.float32) for a in active])
    return [d * a for d, a in zip(deltas, active)], active, count


@register("ram", RamParams, base="required", shape_policy="base", elementwise=True)
def ram(tensors: list[torch.Tensor], base: torch.Tensor | None, params: RamParams):
    """RAM (reinforced agent merging)"""
    assert base is not None
    deltas, _, count = _active(tensors, base, params.epsilon)
    return base + sum_in_order(deltas) / count.clamp_min(1)


def prepare_ramplus(
    chunks: Callable[[], Iterable[tuple[list[torch.Tensor], torch.Tensor | None]]],
    params: RamPlusParams,
) -> RamPlusParams:
    """Each model's boost from its shared and unique entries, counted over the whole
    tensor's row chunks."""
    import torch

    shared_total = unique_total = None
    for xs, base, *_ in chunks():
        assert base is not None
        _, active, count = _active(xs, base, params.epsilon)
        shared_at, unique_at = count > 1, count == 1
        shared = torch.stack([(a & shared_at).sum() for a in active]).cpu()
        unique = torch.stack([(a & unique_at).sum() for a in active]).cpu()
        shared_total = shared if shared_total is None else shared_total + shared
        unique_total = unique if unique_total is None else unique_total + unique
    assert shared_total is not None and unique_total is not None
    flat_shared, flat_unique = shared_total.float(), unique_total.float()
    # overlap ratio of each model: its shared entries per unique entry (0 with none unique)
    ratio = torch.where(flat_unique > 0, flat_shared / flat_unique.clamp_min(1), 0.0)
    boost = 1.0 + params.r * ratio.clamp(0.0, params.alpha)
    return params.model_copy(update={"boost": tuple(boost.tolist())})


@register("ramplus_tl", RamPlusParams, base="required", shape_policy="base", elementwise=True,
          prepare=prepare_ramplus)
def ramplus_tl(tensors: list[torch.Tensor], base: torch.Tensor | None,
               params: RamPlusParams):
    """RAM+ (reinforced agent merging, with unique-entry rescaling)

    Each model's unique entries are scaled by 1 + r * min(shared / unique, alpha), its
    counts of shared and unique entries over the whole tensor."""
    import torch

    assert base is not None
    if params.boost is None:
        params = prepare_ramplus(lambda: [(tensors, base)], params)
    assert params.boost is not None
    deltas, active, count = _active(tensors, base, params.epsilon)
    shared_at, unique_at = count > 1, count == 1
    unique_part = sum_in_order([d * (a & unique_at) * b
                          for d, a, b in zip(deltas, active, params.boost)])
    shared_part = sum_in_order([d * (a & shared_at) for d, a in zip(deltas, active)])
    return base + unique_part + torch.where(shared_at, shared_part / count.clamp_min(1), 0.0)
