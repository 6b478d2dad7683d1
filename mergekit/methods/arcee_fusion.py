from __future__ import annotations

from typing import TYPE_CHECKING

from mergekit.methods.registry import MethodParams, register

if TYPE_CHECKING:
    import torch


class ArceeFusionParams(MethodParams):
    pass


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolated quantile of a flat tensor (no size limit, unlike torch.quantile)."""
    import torch

    n = values.numel()
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    low = torch.kthvalue(values, lo + 1).values
    high = torch.kthvalue(values, hi + 1).values if hi != lo else low
    return low + (high - low) * frac


@register("arcee_fusion", ArceeFusionParams, base="required", min_models=1, max_models=1,
          shape_policy="base")
def arcee_fusion(tensors: list[torch.Tensor], base: torch.Tensor | None,
                 params: ArceeFusionParams):
    """Arcee Fusion (keep the most important changes)"""
    import torch

    assert base is not None
    (other,) = tensors
    delta = other - base
    rows_base = base.reshape(-1, base.shape[-1]) if base.dim() > 0 else base.reshape(1, 1)
    rows_other = other.reshape(rows_base.shape)
    log_p = torch.log_softmax(rows_other, dim=-1)
    log_q = torch.log_softmax(rows_base, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1, keepdim=True)  # (rows, 1)
    importance = (delta.reshape(rows_base.shape).abs() * kl).reshape(-1)
    q1, median, q3 = (quantile(importance, q) for q in (0.25, 0.5, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    keep = (importance > threshold).reshape(base.shape)
    return base + delta * keep
