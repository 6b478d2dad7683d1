from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from mergekit.methods.registry import RandomParams, prepared, register

if TYPE_CHECKING:
    import torch

# Quantiles of larger tensors are estimated on this many entries drawn at random.
QUANTILE_SAMPLE = 1_000_000


class ArceeFusionParams(RandomParams):
    # Set by prepare_arcee_fusion: the whole tensor's importance threshold, so row chunks
    # merge as the whole tensor would.
    threshold: float | None = prepared()
    # Set by prepare_arcee_fusion: each row's divergence (a tensor), computed once.
    row_kl: Any = prepared()


def lower_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The order statistic at floor(q * (n - 1)) (from 0) of ``values`` (no interpolation),
    by selection rather than a sort."""
    import torch

    return torch.kthvalue(values, int(q * (values.numel() - 1)) + 1).values


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The vectors softmax runs over: ``x`` as (rows, last dimension)."""
    return x.reshape(-1, x.shape[-1]) if x.dim() > 0 else x.reshape(1, 1)


def row_divergence(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(model row) || softmax(base row)) of each row (softmax over the last
    dimension), shape (rows,). Row-local: a row chunk's values are the whole tensor's."""
    import torch

    p = torch.softmax(_rows(other), dim=-1) + 1e-8
    q = torch.softmax(_rows(base), dim=-1) + 1e-8
    return (p * torch.log(p / q)).sum(dim=-1)


def importance(delta: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
    """|delta| times its row's divergence ``kl``, flat."""
    return (_rows(delta).abs() * kl.unsqueeze(-1)).reshape(-1)


def prepare_arcee_fusion(
    chunks: Callable[[], Iterable[tuple[list[torch.Tensor], torch.Tensor | None, int]]],
    params: ArceeFusionParams,
) -> ArceeFusionParams:
    """Each row's divergence, and the threshold median + 1.5 IQR of the whole tensor's
    importances, from every entry or, above QUANTILE_SAMPLE entries, from a seeded sample
    of positions drawn over the whole tensor and gathered from the chunks that hold them."""
    import torch

    numel = params.numel
    if numel == 0:  # not set by the engine: the chunks are all of the tensor
        numel = sum(base.numel() for _, base, _ in chunks())
    if numel == 0:  # an empty tensor: the method returns it as it is
        return params.model_copy(update={"threshold": 0.0, "row_kl": torch.empty(0)})
    picks = None
    if numel > QUANTILE_SAMPLE:
        gen = torch.Generator(device="cpu").manual_seed(params.seed)
        # the sample is a multiset of positions: sorted, each chunk takes a slice of it
        picks = torch.randint(numel, (QUANTILE_SAMPLE,), generator=gen).sort().values
    kl = values = None
    for (other,), base, offset in chunks():
        assert base is not None
        chunk_kl = row_divergence(other, base)
        row_len = _rows(base).shape[-1]
        if kl is None:
            # filled chunk by chunk: buffers that outlive the loop are allocated once, as
            # small tensors kept from every chunk would be placed between the chunks'
            # large temporaries and fragment the heap, raising peak memory
            kl = chunk_kl.new_empty(numel // row_len)
            values = chunk_kl.new_empty(numel if picks is None else QUANTILE_SAMPLE)
        assert values is not None
        first = offset // row_len
        kl[first:first + chunk_kl.numel()] = chunk_kl
        chunk_values = importance(other - base, chunk_kl)
        if picks is None:
            values[offset:offset + chunk_values.numel()] = chunk_values
        else:
            lo, hi = (int(i) for i in torch.searchsorted(
                picks, torch.tensor([offset, offset + chunk_values.numel()])))
            values[lo:hi] = chunk_values[(picks[lo:hi] - offset).to(chunk_values.device)]
    assert values is not None
    q1, median, q3 = (lower_quantile(values, f) for f in (0.25, 0.5, 0.75))
    return params.model_copy(update={"threshold": float(median + 1.5 * (q3 - q1)),
                                     "row_kl": kl})


@register("arcee_fusion", ArceeFusionParams, base="required", min_models=1, max_models=1,
          shape_policy="base", random=True, elementwise=True, prepare=prepare_arcee_fusion)
def arcee_fusion(tensors: list[torch.Tensor], base: torch.Tensor | None,
                 params: ArceeFusionParams):
    """Arcee Fusion (keep the most important changes)

    importance = |delta| * KL(softmax(model row) || softmax(base row)); entries whose
    importance reaches median + 1.5 * IQR are taken from the model, the rest from the base.
    """
    assert base is not None
    if base.numel() == 0:  # nothing to choose (and no rows to take a divergence of)
        return base.clone()
    if params.threshold is None:
        params = prepare_arcee_fusion(lambda: [(tensors, base, 0)], params)
    assert params.threshold is not None and params.row_kl is not None
    (other,) = tensors
    rows = _rows(base)
    first = params.offset // rows.shape[-1]  # this chunk's first row
    kl = params.row_kl[first:first + rows.shape[0]]
    delta = other - base
    keep = (importance(delta, kl) >= params.threshold).reshape(base.shape)
    return base + delta * keep
