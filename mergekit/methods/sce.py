from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from mergekit.methods.registry import PositionalParams, prepared, register
from mergekit.methods.task_vectors import (
    Edge,
    magnitude_bits,
    magnitude_ranks,
    ranked_first,
    sum_in_order,
)

if TYPE_CHECKING:
    import torch

# Below this total mean-square of the task vectors the weights fall back to uniform, and
# the divisor is never smaller than it (as the established tool does).
SMALL = 1e-6


class SceParams(PositionalParams):
    select_topk: float = Field(
        1.0, description="fraction of positions kept, those whose task vectors vary most"
    )
    int8_mask: bool = Field(False, description="store masks as int8 (accepted; no effect)")
    # Set by prepare_sce from passes over the whole tensor, so row chunks merge as the whole
    # tensor would: the selection's edge (the last position kept, by variance), by offset
    # how many positions of equal variance come before each row chunk, and the models'
    # energy weights.
    edge: Edge = prepared()
    equal_before: dict[int, int] | None = prepared()
    weights: tuple[float, ...] | None = prepared()

    @field_validator("select_topk")
    @classmethod
    def _range(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"select_topk {v} is outside (0, 1]")
        return v


def _deltas(tensors: list[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    return [x - base for x in tensors]


def _variance(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Per position, the variance over the models (population), as mean((d - mean)^2),
    model by model (torch's ``var`` over a stacked models' dimension is far slower)."""
    n = len(deltas)
    mean = sum_in_order(deltas).div_(n)
    return sum_in_order((d - mean).square_() for d in deltas).div_(n)


def _variance_bits(deltas: list[torch.Tensor]) -> torch.Tensor:
    return magnitude_bits(_variance(deltas))


def _selected(deltas: list[torch.Tensor], params: SceParams, equal_before: int,
              bits: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The task vectors with the positions not selected (by variance) set to zero;
    ``bits``: their ``_variance_bits`` where already known."""
    if params.select_topk >= 1.0:
        return deltas
    bits = _variance_bits(deltas) if bits is None else bits
    keep = ranked_first(bits, params.edge, equal_before).reshape(deltas[0].shape)
    return [d * keep for d in deltas]


def prepare_sce(
    chunks: Callable[[], Iterable[tuple[list[torch.Tensor], torch.Tensor, int]]],
    params: SceParams,
) -> SceParams:
    """The top-k selection of positions by variance (radix selection; positions of equal
    variance in index order) and the energy weights, from passes over row chunks of
    (inputs, base, offset)."""
    import torch

    edge: Edge = None
    if params.select_topk < 1.0:
        ks: list[int] = []

        def top(nonzero: int) -> list[int]:
            # the top fraction of the positions where the models differ at all
            ks.append(int(params.select_topk * nonzero))
            return [ks[0]] if ks[0] > 0 else []

        (found,) = magnitude_ranks(
            lambda: ([_variance(_deltas(xs, base))] for xs, base, *_ in chunks()), [top],
            nonzero=True)
        if found:
            edge = (found[0][0], ks[0] - found[0][1])
    params = params.model_copy(update={"edge": edge})
    equal_before: dict[int, int] = {}
    seen = 0
    energy = None  # per model, sum of squares of the selected task vector
    numel = 0
    for xs, base, offset in chunks():
        deltas = _deltas(xs, base)
        equal_before[offset] = seen
        bits = None
        if params.select_topk < 1.0 and edge is not None:
            bits = _variance_bits(deltas)
            seen += int((bits == edge[0]).sum())
        selected = _selected(deltas, params, equal_before[offset], bits)
        squares = torch.stack([d.square().sum(dtype=torch.float64) for d in selected]).cpu()
        energy = squares if energy is None else energy + squares
        numel += base.numel()
    assert energy is not None
    means = [float(e) / max(numel, 1) for e in energy]  # an empty tensor: all 0
    total = sum(means)
    # below SMALL the weights fall back to uniform
    weights = [1.0 / len(means)] * len(means) if total < SMALL else [m / total for m in means]
    return params.model_copy(update={"equal_before": equal_before, "weights": tuple(weights)})


@register("sce", SceParams, base="required", shape_policy="base", min_models=1,
          elementwise=True, prepare=prepare_sce)
def sce(tensors: list[torch.Tensor], base: torch.Tensor | None, params: SceParams):
    """SCE (select, calculate, erase)

    https://arxiv.org/abs/2408.07990
    """
    import torch

    assert base is not None
    if params.weights is None:
        params = prepare_sce(lambda: [(tensors, base, params.offset)], params)
    assert params.weights is not None and params.equal_before is not None
    deltas = _selected(_deltas(tensors, base), params, params.equal_before[params.offset])
    # the sign of the unweighted sum is elected; zero entries never agree
    elected = torch.where(sum_in_order(deltas) >= 0, 1.0, -1.0)
    mixed = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for w, d in zip(params.weights, deltas):
        agree = (torch.sign(d) == elected).to(d.dtype)
        mixed.add_(d * agree, alpha=w)
        divisor.add_(agree, alpha=w)
    return base + mixed / divisor.clamp_min_(SMALL)
