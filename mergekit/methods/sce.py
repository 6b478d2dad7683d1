from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from mergekit.methods.registry import MethodParams, register
from mergekit.methods.task_vectors import elect_sign_mask

if TYPE_CHECKING:
    import torch

# Below this total mean-square of the task vectors the weights fall back to uniform, and
# the divisor is never smaller than it (as the established tool does).
SMALL = 1e-6


class SceParams(MethodParams):
    select_topk: float = Field(
        1.0, description="fraction of positions kept, those whose task vectors vary most"
    )
    int8_mask: bool = Field(False, description="store masks as int8 (accepted; no effect)")

    @field_validator("select_topk")
    @classmethod
    def _range(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"select_topk {v} is outside (0, 1]")
        return v


@register("sce", SceParams, base="required", shape_policy="base", min_models=1)
def sce(tensors: list[torch.Tensor], base: torch.Tensor | None, params: SceParams):
    """SCE (select, calculate, erase)

    https://arxiv.org/abs/2408.07990
    """
    import torch

    assert base is not None
    deltas = torch.stack([x - base for x in tensors])  # (n_models, *shape)
    if params.select_topk < 1.0:
        variance = deltas.var(dim=0, unbiased=False).reshape(-1)
        # top fraction of the positions where the models differ at all
        k = int(params.select_topk * int(torch.count_nonzero(variance)))
        keep = torch.zeros_like(variance, dtype=torch.bool)
        if k > 0:
            keep[torch.topk(variance, k, sorted=False).indices] = True
        deltas = deltas * keep.reshape(base.shape)
    energy = deltas.pow(2).reshape(deltas.shape[0], -1).mean(dim=1)  # (n_models,)
    total = float(energy.sum())
    if total < SMALL:
        weights = torch.full_like(energy, 1.0 / len(tensors))
    else:
        weights = energy / total
    agree = elect_sign_mask(deltas, "sum")  # the sign of the unweighted sum
    w = weights.reshape(-1, *([1] * base.dim()))
    mixed = (deltas * w * agree).sum(dim=0)
    divisor = (w * agree).sum(dim=0).clamp_min(SMALL)
    return base + mixed / divisor
