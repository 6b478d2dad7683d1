"""Model Breadcrumbs: each task vector drops its largest ``gamma`` fraction of entries by
magnitude (outliers) and keeps the next ``density`` fraction (the band), then the vectors
are rescaled and combined like the rest of the task-arithmetic family
(``task_arithmetic.py``).

Ranks follow |value|, descending, equal magnitudes in index order (a stable sort's order).
A prepare pass finds, per task vector, the bit patterns of the magnitudes at the band's two
edges by radix selection and, for each row chunk, how many entries equal to each edge come
before it, so row chunks keep exactly the entries the whole tensor would; no sort (a sort
of a large tensor is far slower, and its int64 indices take twice the tensor's memory).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from mergekit.methods.registry import PerModelFloat, PositionalParams, prepared, register
from mergekit.methods.task_arithmetic import (
    Consensus,
    check_density,
    consensus_field,
    density_field,
    int8_mask_field,
    lambda_field,
    sparse_merge,
    weight_field,
)
from mergekit.methods.task_vectors import Edge, magnitude_bits, magnitude_ranks, ranked_first

if TYPE_CHECKING:
    import torch

# A task vector's band: the entries ranked in by ``end`` and not by ``top``; None: all.
Band = tuple[Edge, Edge] | None


class BreadcrumbsParams(PositionalParams):
    weight: PerModelFloat = weight_field()
    density: PerModelFloat = density_field()
    gamma: PerModelFloat = Field(0.01, description="fraction of largest-magnitude entries "
                                 "dropped")
    normalize: bool = Field(False, description="divide by the summed weights")
    rescale: bool = Field(False, description="rescale the kept entries to the task vector's "
                          "L1 norm")
    lambda_: float = lambda_field()
    int8_mask: bool = int8_mask_field()
    # Set by prepare_breadcrumbs from passes over the whole tensor: per model, its band;
    # by (offset, model), how many entries equal to each edge (end, top) come before the
    # row chunk at that offset; per model, the L1 rescale factor (with rescale).
    bands: tuple[Band, ...] | None = prepared()
    equal_before: dict[tuple[int, int], tuple[int, int]] | None = prepared()
    l1_scale: tuple[float, ...] | None = prepared()

    @model_validator(mode="after")
    def _gamma(self) -> BreadcrumbsParams:
        check_density(self.density)
        for g in self.gamma:
            if not 0.0 <= g < 1.0:
                raise ValueError(f"gamma {g} is outside [0, 1)")
        return self


class BreadcrumbsTiesParams(BreadcrumbsParams):
    consensus: Consensus = consensus_field()


def band_ranks(numel: int, density: float, gamma: float) -> tuple[int, int] | None:
    """(entries ranked before the band's end, before its start); None keeps all. The kept
    count is int(density * numel) whatever the size, so a tensor too small to drop any
    outlier still keeps its share."""
    keep_count = int(density * numel)
    if keep_count >= numel:
        return None
    drop_top = min(int(gamma * numel), numel - keep_count) if keep_count > 0 else 0
    return drop_top + keep_count, drop_top


def band_mask(bits: torch.Tensor, band: Band, before: tuple[int, int]) -> torch.Tensor:
    """Mask of the chunk's entries (their ``magnitude_bits``) inside ``band``; ``before``:
    entries equal to the (end, top) edges in earlier chunks."""
    import torch

    if band is None:
        return torch.ones(bits.shape, dtype=torch.bool, device=bits.device)
    end, top = band
    keep = ranked_first(bits, end, before[0])
    if top is not None:  # the entries ranked before the band: a subset of those
        keep &= ~ranked_first(bits, top, before[1])
    return keep


def prepare_breadcrumbs(
    chunks: Callable[[], Iterable[tuple[list[torch.Tensor], torch.Tensor, int]]],
    params: BreadcrumbsParams,
) -> BreadcrumbsParams:
    """The bands, the edge counts before each row chunk and the L1 rescale factors, from
    passes over row chunks of (inputs, base, offset)."""
    import torch

    models = len(params.density)
    sparse = [i for i, d in enumerate(params.density) if d < 1.0]
    bands: list[Band] = [None] * models
    wanted: dict[int, tuple[int, int] | None] = {}

    def ranks(i: int) -> Callable[[int], list[int]]:
        def of(numel: int) -> list[int]:
            wanted[i] = band_ranks(numel, params.density[i], params.gamma[i])
            return [k for k in wanted[i] or () if k > 0]
        return of

    def deltas() -> Iterable[list[torch.Tensor]]:
        return ([xs[i] - base for i in sparse] for xs, base, *_ in chunks())

    if sparse:
        found = magnitude_ranks(deltas, [ranks(i) for i in sparse])
        for i, edges in zip(sparse, found):
            if wanted[i] is None:
                continue
            by_rank = dict(zip([k for k in wanted[i] if k > 0], edges))
            end, top = ((by_rank[k][0], k - by_rank[k][1]) if k > 0 else None
                        for k in wanted[i])
            bands[i] = (end, top)
    equal_before: dict[tuple[int, int], tuple[int, int]] = {}
    seen = [[0, 0] for _ in range(models)]  # entries equal to each edge so far
    totals = torch.zeros((models, 2), dtype=torch.float64)  # sum |d|, sum |kept|
    for xs, base, offset in chunks():
        for i in sparse:
            equal_before[(offset, i)] = (seen[i][0], seen[i][1])
            if bands[i] is None:
                continue
            delta = xs[i] - base
            bits = magnitude_bits(delta)
            for side, edge in enumerate(bands[i]):
                if edge is not None:
                    seen[i][side] += int((bits == edge[0]).sum())
            if params.rescale:
                kept = band_mask(bits, bands[i], equal_before[(offset, i)])
                totals[i, 0] += delta.abs().sum(dtype=torch.float64).cpu()
                totals[i, 1] += (delta.reshape(-1) * kept).abs().sum(dtype=torch.float64).cpu()
    scales = tuple(float(a / b) if b > 0 else 1.0 for a, b in totals.tolist())
    return params.model_copy(update={"bands": tuple(bands), "equal_before": equal_before,
                                     "l1_scale": scales if params.rescale else None})


def _breadcrumbs(tensors: list[torch.Tensor], base: torch.Tensor | None,
                 params: BreadcrumbsParams, consensus: str | None) -> torch.Tensor:
    assert base is not None
    if params.bands is None:
        params = prepare_breadcrumbs(lambda: [(tensors, base, params.offset)], params)
    assert params.bands is not None and params.equal_before is not None

    def sparsify(delta: torch.Tensor, density: float, i: int) -> tuple[torch.Tensor, float]:
        before = params.equal_before[(params.offset, i)]
        keep = band_mask(magnitude_bits(delta), params.bands[i], before)
        return delta * keep.reshape(delta.shape), density

    return sparse_merge(tensors, base, params, sparsify, consensus)


@register("breadcrumbs", BreadcrumbsParams, base="required", shape_policy="base",
          elementwise=True, prepare=prepare_breadcrumbs)
def breadcrumbs(tensors: list[torch.Tensor], base: torch.Tensor | None,
                params: BreadcrumbsParams):
    """Model Breadcrumbs

    https://arxiv.org/abs/2312.06795
    """
    return _breadcrumbs(tensors, base, params, None)


@register("breadcrumbs_ties", BreadcrumbsTiesParams, base="required", shape_policy="base",
          elementwise=True, prepare=prepare_breadcrumbs)
def breadcrumbs_ties(tensors: list[torch.Tensor], base: torch.Tensor | None,
                     params: BreadcrumbsTiesParams):
    """Model Breadcrumbs (with TIES sign consensus)

    https://arxiv.org/abs/2312.06795
    """
    return _breadcrumbs(tensors, base, params, params.consensus)
