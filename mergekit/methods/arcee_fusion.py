from __future__ import annotations

from typing import TYPE_CHECKING

from mergekit.methods.registry import RandomParams, register

if TYPE_CHECKING:
    import torch

# Quantiles of larger tensors are estimated on this many entries drawn at random.
QUANTILE_SAMPLE = 1_000_000


class ArceeFusionParams(RandomParams):
    pass


def lower_quantile(sorted_values: torch.Tensor, q: float) -> torch.Tensor:
    """The order statistic at floor(q * (n - 1)) of an ascending tensor (no interpolation)."""
    return sorted_values[int(q * (sorted_values.numel() - 1))]


@register("arcee_fusion", ArceeFusionParams, base="required", min_models=1, max_models=1,
          shape_policy="base", random=True)
def arcee_fusion(tensors: list[torch.Tensor], base: torch.Tensor | None,
                 params: ArceeFusionParams):
    """Arcee Fusion (keep the most important changes)

    importance = |delta| * KL(softmax(model row) || softmax(base row)); entries whose
    importance reaches median + 1.5 * IQR are taken from the model, the rest from the base.
    """
    import torch

    assert base is not None
    (other,) = tensors
    delta = other - base
    rows_base = base.reshape(-1, base.shape[-1]) if base.dim() > 0 else base.reshape(1, 1)
    rows_other = other.reshape(rows_base.shape)
    p = torch.softmax(rows_other, dim=-1) + 1e-8
    q = torch.softmax(rows_base, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)  # (rows, 1)
    importance = (delta.reshape(rows_base.shape).abs() * kl).reshape(-1)
    values = importance
    if values.numel() > QUANTILE_SAMPLE:
        gen = torch.Generator(device="cpu").manual_seed(params.seed)
        picks = torch.randint(values.numel(), (QUANTILE_SAMPLE,), generator=gen)
        values = values[picks.to(values.device)]
    ordered = torch.sort(values).values
    q1, median, q3 = (lower_quantile(ordered, f) for f in (0.25, 0.5, 0.75))
    keep = (importance >= median + 1.5 * (q3 - q1)).reshape(base.shape)
    return base + delta * keep
