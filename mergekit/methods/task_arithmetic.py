"""The task-arithmetic family: merge task vectors (model - base) after optional
sparsification, sign consensus and rescaling. Every method of the family is a choice of
steps from this file and ``task_vectors.py``; the random sparsifiers (DARE, DELLA) are in
``dare.py`` and the magnitude-band one (Model Breadcrumbs) in ``breadcrumbs.py``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Literal, Protocol

from pydantic import Field, model_validator

from mergekit.methods.registry import MethodParams, PerModelFloat, prepared, register
from mergekit.methods.task_vectors import (
    combine,
    keep_top_magnitude,
    kth_largest_magnitudes,
    rescale_l1,
    sum_in_order,
)

if TYPE_CHECKING:
    import torch

RescaleMode = Literal["l1", "inverse_density"]
Consensus = Literal["sum", "count"]


# -- parameters ----------------------------------------------------------------------


def weight_field() -> object:
    return Field(description="weight of this model's task vector")


def density_field() -> object:
    return Field(1.0, description="fraction of each task vector's entries kept")


def lambda_field() -> object:
    return Field(1.0, alias="lambda", description="scale of the merged task vector")


def int8_mask_field() -> object:
    return Field(False, description="store masks as int8 (accepted; no effect on results)")


def check_density(densities: Sequence[float]) -> None:
    for d in densities:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"density {d} is outside [0, 1]")


class TaskArithmeticParams(MethodParams):
    weight: PerModelFloat = weight_field()
    density: PerModelFloat = Field(
        1.0, description="accepted for compatibility; task_arithmetic keeps every entry")
    normalize: bool = Field(False, description="divide by the sum of the weights")
    rescale: bool = Field(False, description="accepted for compatibility; no effect here")
    lambda_: float = lambda_field()
    int8_mask: bool = int8_mask_field()


def consensus_field() -> object:
    return Field(
        "sum", description="sign election: sign of the weighted sum, or the majority of signs"
    )


class TiesParams(MethodParams):
    weight: PerModelFloat = weight_field()
    density: PerModelFloat = density_field()
    normalize: bool = Field(
        True, description="divide by the summed weights of the models that agree on the sign"
    )
    rescale: bool = Field(
        False, description="scale each pruned task vector back to its original L1 norm")
    lambda_: float = lambda_field()
    int8_mask: bool = int8_mask_field()
    consensus: Consensus = consensus_field()
    # Set by prepare_ties from passes over the whole tensor, so that row chunks merge
    # exactly as the whole tensor would: per model, the smallest kept magnitude and the
    # L1 rescale factor.
    magnitude_floor: tuple[float, ...] | None = prepared()
    l1_scale: tuple[float, ...] | None = prepared()

    @model_validator(mode="after")
    def _densities(self) -> TiesParams:
        check_density(self.density)
        return self


class SparseParams(Protocol):
    """What ``sparse_merge`` reads of the params of the methods that call it (DARE, DELLA,
    Model Breadcrumbs); ``_rescaled`` also reads ``rescale_mode`` and ``l1_scale`` where
    they have them."""

    @property
    def weight(self) -> tuple[float, ...]: ...

    @property
    def density(self) -> tuple[float, ...]: ...

    @property
    def normalize(self) -> bool: ...

    @property
    def rescale(self) -> bool: ...

    @property
    def lambda_(self) -> float: ...


# -- the methods -----------------------------------------------------------------------


@register("task_arithmetic", TaskArithmeticParams, base="required", shape_policy="base",
          elementwise=True, arrays=True)
def task_arithmetic(tensors: list[torch.Tensor], base: torch.Tensor | None,
                    params: TaskArithmeticParams):
    """Task Arithmetic

    https://arxiv.org/abs/2212.04089
    """
    import numpy as np

    assert base is not None
    # the weights and their sum as float32 values, as the math is done in
    weights = np.array(params.weight, dtype=np.float32)

    def weighted(x: torch.Tensor, w: float) -> torch.Tensor:
        delta = x - base
        delta *= w
        return delta

    mixed = sum_in_order(weighted(x, w) for x, w in zip(tensors, weights.tolist()))
    if params.normalize:
        total = weights.sum(dtype=np.float32).item()
        mixed /= total if total != 0 else 1.0
    if params.lambda_ != 1.0:
        mixed *= params.lambda_
    mixed += base
    return mixed


def prepare_ties(
    chunks: Callable[[], Iterable[tuple[list[torch.Tensor], torch.Tensor]]],
    params: TiesParams,
) -> TiesParams:
    """Whole-tensor statistics of ties, from passes over row chunks of (inputs, base)."""
    import torch

    sparse = [i for i, d in enumerate(params.density) if d < 1.0]
    floors = [0.0] * len(params.density)
    if sparse:

        def deltas() -> Iterable[list[torch.Tensor]]:
            return ([xs[i] - base for i in sparse] for xs, base, *_ in chunks())

        densities = [params.density[i] for i in sparse]
        for i, floor in zip(sparse, kth_largest_magnitudes(deltas, densities)):
            floors[i] = floor
    scales = None
    if params.rescale:
        totals = torch.zeros((len(floors), 2), dtype=torch.float64)  # (sum |d|, sum |kept|)
        for xs, base, *_ in chunks():
            for i, floor in enumerate(floors):
                magnitude = (xs[i] - base).abs()
                totals[i, 0] += magnitude.sum(dtype=torch.float64).cpu()
                kept = keep_top_magnitude(magnitude, params.density[i], floor)
                totals[i, 1] += kept.sum(dtype=torch.float64).cpu()
        scales = tuple(float(a / b) if b > 0 and d < 1.0 else 1.0
                       for (a, b), d in zip(totals.tolist(), params.density))
    return params.model_copy(update={"magnitude_floor": tuple(floors), "l1_scale": scales})


@register("ties", TiesParams, base="required", shape_policy="base", elementwise=True,
          prepare=prepare_ties)
def ties(tensors: list[torch.Tensor], base: torch.Tensor | None, params: TiesParams):
    """TIES

    https://arxiv.org/abs/2306.01708
    """
    assert base is not None
    if params.magnitude_floor is None:
        params = prepare_ties(lambda: [(tensors, base)], params)
    assert params.magnitude_floor is not None
    deltas = []
    for i, (x, density) in enumerate(zip(tensors, params.density)):
        kept = keep_top_magnitude(x - base, density, params.magnitude_floor[i])
        deltas.append(kept * params.l1_scale[i] if params.l1_scale else kept)
    return combine(base, deltas, params.weight, consensus=params.consensus,
                   normalize=params.normalize, lambda_=params.lambda_)


def _rescaled(delta: torch.Tensor, kept: torch.Tensor, probs: torch.Tensor | float,
              params: SparseParams, i: int) -> torch.Tensor:
    import torch

    if not params.rescale:
        return kept
    if getattr(params, "rescale_mode", "l1") == "l1":
        scales = getattr(params, "l1_scale", None)
        return kept * scales[i] if scales is not None else rescale_l1(delta, kept)
    if isinstance(probs, float):
        return kept / probs if probs > 0 else kept
    return kept / torch.where(probs > 0, probs, 1.0)


def sparse_merge(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    params: SparseParams,
    sparsify: Callable[[torch.Tensor, float, int], tuple[torch.Tensor, torch.Tensor | float]],
    consensus: str | None,
) -> torch.Tensor:
    """Sparsify each task vector (``sparsify(delta, density, model_index)`` returns the kept
    entries and their keep probabilities), rescale, combine."""
    assert base is not None
    deltas = []
    for i, (x, density) in enumerate(zip(tensors, params.density)):
        delta = x - base
        if density >= 1.0:
            deltas.append(delta)
            continue
        kept, probs = sparsify(delta, density, i)
        deltas.append(_rescaled(delta, kept, probs, params, i))
    return combine(base, deltas, params.weight, consensus=consensus,
                   normalize=params.normalize, lambda_=params.lambda_)
