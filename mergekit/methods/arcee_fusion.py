from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from pydantic import Field

from mergekit.methods.registry import RandomParams, register

if TYPE_CHECKING:
    import torch

# Quantiles of larger tensors are estimated on this many entries drawn at random.
QUANTILE_SAMPLE = 1_000_000


class ArceeFusionParams(RandomParams):
    # Set by prepare_arcee_fusion: the whole tensor's importance threshold, so row chunks
    # merge as the whole tensor would.
    threshold: float | None = Field(None, description="internal",
                                    json_schema_extra={"internal": True})


def lower_quantile(sorted_values: torch.Tensor, q: float) -> torch.Tensor:
    """The order statistic at floor(q * (n - 1)) of an ascending tensor (no interpolation)."""
    return sorted_values[int(q * (sorted_values.numel() - 1))]


def importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|delta| times the KL divergence of the model's row from the base's (softmax over the
    last dimension), flat. Row-local: a row chunk's values are the whole tensor's."""
    import torch

    rows_base = base.reshape(-1, base.shape[-1]) if base.dim() > 0 else base.reshape(1, 1)
    rows_other = other.reshape(rows_base.shape)
    p = torch.softmax(rows_other, dim=-1) + 1e-8
    q = torch.softmax(rows_base, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)  # (rows, 1)
    return ((rows_other - rows_base).abs() * kl).reshape(-1)


def prepare_arcee_fusion(
    chunks: Callable[[], Iterable[tuple[list[torch.Tensor], torch.Tensor | None, int]]],
    params: ArceeFusionParams,
) -> ArceeFusionParams:
    """The threshold median + 1.5 IQR of the whole tensor's importances, from every entry
    or, above QUANTILE_SAMPLE entries, from a seeded sample of positions drawn over the
    whole tensor and gathered from the chunks that hold them."""
    import torch

    picks = None
    if params.numel > QUANTILE_SAMPLE:
        gen = torch.Generator(device="cpu").manual_seed(params.seed)
        # the sample is a multiset of positions: sorted, each chunk takes a slice of it
        picks = torch.randint(params.numel, (QUANTILE_SAMPLE,), generator=gen).sort().values
    parts = []
    for (other,), base, offset in chunks():
        assert base is not None
        values = importance(other, base)
        if picks is not None:
            lo, hi = torch.searchsorted(picks, torch.tensor([offset, offset + values.numel()]))
            values = values[(picks[int(lo):int(hi)] - offset).to(values.device)]
        parts.append(values)
    ordered = torch.sort(torch.cat(parts)).values
    q1, median, q3 = (lower_quantile(ordered, f) for f in (0.25, 0.5, 0.75))
    return params.model_copy(update={"threshold": float(median + 1.5 * (q3 - q1))})


@register("arcee_fusion", ArceeFusionParams, base="required", min_models=1, max_models=1,
          shape_policy="base", random=True, elementwise=True, prepare=prepare_arcee_fusion)
def arcee_fusion(tensors: list[torch.Tensor], base: torch.Tensor | None,
                 params: ArceeFusionParams):
    """Arcee Fusion (keep the most important changes)

    importance = |delta| * KL(softmax(model row) || softmax(base row)); entries whose
    importance reaches median + 1.5 * IQR are taken from the model, the rest from the base.
    """
    assert base is not None
    if params.threshold is None:
        whole = params.model_copy(update={"numel": base.numel(), "offset": 0})
        params = prepare_arcee_fusion(lambda: [(tensors, base, 0)], whole)
    assert params.threshold is not None
    (other,) = tensors
    keep = (importance(other, base) >= params.threshold).reshape(base.shape)
    return base + (other - base) * keep
