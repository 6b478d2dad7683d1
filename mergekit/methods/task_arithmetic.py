"""The task-arithmetic family: merge task vectors (model - base) after optional
sparsification, sign consensus and rescaling. Every method of the family is a choice of
steps from this file."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from mergekit.methods.registry import MethodParams, PerModelFloat, RandomParams, register
from mergekit.methods.task_vectors import (
    combine,
    della_probabilities,
    keep_magnitude_band,
    keep_top_magnitude,
    kth_largest_magnitudes,
    pack_mask,
    random_mask,
    rescale_l1,
    unpack_mask,
)

if TYPE_CHECKING:
    import torch

RescaleMode = Literal["l1", "inverse_density"]
Consensus = Literal["sum", "count"]


# -- parameters ----------------------------------------------------------------------


def _weight() -> object:
    return Field(description="weight of this model's task vector")


def _density() -> object:
    return Field(1.0, description="fraction of each task vector's entries kept")


def _lambda() -> object:
    return Field(1.0, alias="lambda", description="scale of the merged task vector")


def _int8_mask() -> object:
    return Field(False, description="store masks as int8 (accepted; no effect on results)")


def _check_density(densities: Sequence[float]) -> None:
    for d in densities:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"density {d} is outside [0, 1]")


class TaskArithmeticParams(MethodParams):
    weight: PerModelFloat = _weight()
    density: PerModelFloat = Field(
        1.0, description="accepted for compatibility; task_arithmetic keeps every entry")
    normalize: bool = Field(False, description="divide by the sum of the weights")
    rescale: bool = Field(False, description="accepted for compatibility; no effect here")
    lambda_: float = _lambda()
    int8_mask: bool = _int8_mask()


def _consensus() -> object:
    return Field(
        "sum", description="sign election: sign of the weighted sum, or the majority of signs"
    )


class TiesParams(MethodParams):
    weight: PerModelFloat = _weight()
    density: PerModelFloat = _density()
    normalize: bool = Field(
        True, description="divide by the summed weights of the models that agree on the sign"
    )
    rescale: bool = Field(
        False, description="scale each pruned task vector back to its original L1 norm")
    lambda_: float = _lambda()
    int8_mask: bool = _int8_mask()
    consensus: Consensus = _consensus()
    # Set by prepare_ties from passes over the whole tensor, so that row chunks merge
    # exactly as the whole tensor would: per model, the smallest kept magnitude and the
    # L1 rescale factor.
    magnitude_floor: tuple[float, ...] | None = Field(
        None, description="internal", json_schema_extra={"internal": True})
    l1_scale: tuple[float, ...] | None = Field(
        None, description="internal", json_schema_extra={"internal": True})

    @model_validator(mode="after")
    def _densities(self) -> TiesParams:
        _check_density(self.density)
        return self


class DareParams(RandomParams):
    weight: PerModelFloat = _weight()
    density: PerModelFloat = _density()
    normalize: bool = Field(False, description="divide by the summed weights")
    rescale: bool = Field(True, description="rescale the kept entries after dropping")
    rescale_mode: RescaleMode = Field(
        "l1", description="l1: keep each task vector's L1 norm; inverse_density: divide by "
        "the keep probability (the DARE paper)")
    lambda_: float = _lambda()
    int8_mask: bool = _int8_mask()
    # Set by prepare_random_sparse: per model, the whole tensor's L1 rescale factor.
    l1_scale: tuple[float, ...] | None = Field(
        None, description="internal", json_schema_extra={"internal": True})
    # Set by prepare_random_sparse: the keep masks it drew, packed, by (offset, model), so
    # the merge pass does not draw them again.
    masks: dict[tuple[int, int], Any] | None = Field(
        None, description="internal", json_schema_extra={"internal": True})

    @model_validator(mode="after")
    def _densities(self) -> DareParams:
        _check_density(self.density)
        return self


class DareTiesParams(DareParams):
    consensus: Consensus = _consensus()


class BreadcrumbsParams(MethodParams):
    weight: PerModelFloat = _weight()
    density: PerModelFloat = _density()
    gamma: PerModelFloat = Field(0.01, description="fraction of largest-magnitude entries "
                                 "dropped")
    normalize: bool = Field(False, description="divide by the summed weights")
    rescale: bool = Field(False, description="rescale the kept entries to the task vector's "
                          "L1 norm")
    lambda_: float = _lambda()
    int8_mask: bool = _int8_mask()

    @model_validator(mode="after")
    def _gamma(self) -> BreadcrumbsParams:
        _check_density(self.density)
        for g in self.gamma:
            if not 0.0 <= g < 1.0:
                raise ValueError(f"gamma {g} is outside [0, 1)")
        return self


class BreadcrumbsTiesParams(BreadcrumbsParams):
    consensus: Consensus = _consensus()


class DellaLinearParams(DareParams):
    epsilon: PerModelFloat = Field(0.15, description="spread of keep probabilities around "
                                   "density")

    @model_validator(mode="after")
    def _epsilon(self) -> DellaLinearParams:
        for d, e in zip(self.density, self.epsilon):
            # density 1 keeps everything (no sampling), as for every sparsifier
            if d < 1.0 and not (0.0 < d - e and d + e < 1.0):
                raise ValueError(f"density {d} ± epsilon {e} must stay inside (0, 1)")
        return self


class DellaParams(DellaLinearParams):
    normalize: bool = Field(True, description="divide by the summed weights")
    consensus: Consensus = _consensus()


# -- the methods -----------------------------------------------------------------------


@register("task_arithmetic", TaskArithmeticParams, base="required", shape_policy="base",
          elementwise=True)
def task_arithmetic(tensors: list[torch.Tensor], base: torch.Tensor | None,
                    params: TaskArithmeticParams):
    """Task Arithmetic

    https://arxiv.org/abs/2212.04089
    """
    assert base is not None
    return combine(base, [x - base for x in tensors], params.weight, consensus=None,
                   normalize=params.normalize, lambda_=params.lambda_)


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
              params: DareParams | BreadcrumbsParams, i: int) -> torch.Tensor:
    import torch

    if not params.rescale:
        return kept
    if getattr(params, "rescale_mode", "l1") == "l1":
        scales = getattr(params, "l1_scale", None)
        return kept * scales[i] if scales is not None else rescale_l1(delta, kept)
    if isinstance(probs, float):
        return kept / probs if probs > 0 else kept
    return kept / torch.where(probs > 0, probs, 1.0)


def _sparse_merge(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    params: DareParams | BreadcrumbsParams,
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


def _random_masker(
    params: DareParams,
) -> Callable[[torch.Tensor, float, int], tuple[torch.Tensor, torch.Tensor | float]]:
    """(keep mask, keep probabilities) of dare, or of della (rank-based probabilities), for
    the task vector of model index i at ``params.offset``."""
    if isinstance(params, DellaLinearParams):
        def della(d: torch.Tensor, p: float, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            probs = della_probabilities(d, p, params.epsilon[i])
            return random_mask(d, probs, params.seed, i, params.offset), probs

        return della
    return lambda d, p, i: (random_mask(d, p, params.seed, i, params.offset), p)


def _random_sparsifier(
    params: DareParams,
) -> Callable[[torch.Tensor, float, int], tuple[torch.Tensor, torch.Tensor | float]]:
    """The random sparsifier of dare or della, reusing the masks the prepare pass drew (it
    keeps them only for the L1 rescale, which needs no keep probabilities)."""
    masker = _random_masker(params)

    def sparsify(d: torch.Tensor, p: float, i: int) -> tuple[torch.Tensor, torch.Tensor | float]:
        packed = (params.masks or {}).get((params.offset, i))
        if packed is not None:
            return d * unpack_mask(packed, d), p
        mask, probs = masker(d, p, i)
        return d * mask, probs

    return sparsify


def prepare_random_sparse(
    chunks: Callable[[], Iterable[tuple[list[torch.Tensor], torch.Tensor, int]]],
    params: DareParams,
) -> DareParams:
    """Whole-tensor L1 rescale factors of dare and della, from a pass over row chunks; the
    masks drawn are kept (packed) for the merge pass. The draws depend only on each
    element's position, so they are the same whatever the chunking."""
    import torch

    if not params.rescale or params.rescale_mode != "l1":
        return params.model_copy(update={"l1_scale": (1.0,) * len(params.density)})
    totals = torch.zeros((len(params.density), 2), dtype=torch.float64)  # sum |d|, sum |kept|
    masks = {}
    for xs, base, offset in chunks():
        masker = _random_masker(params.model_copy(update={"offset": offset}))
        for i, density in enumerate(params.density):
            if density < 1.0:
                delta = xs[i] - base
                mask, _ = masker(delta, density, i)
                totals[i, 0] += delta.abs().sum(dtype=torch.float64).cpu()
                totals[i, 1] += (delta * mask).abs().sum(dtype=torch.float64).cpu()
                masks[(offset, i)] = pack_mask(mask)
    scales = tuple(float(a / b) if b > 0 else 1.0 for a, b in totals.tolist())
    return params.model_copy(update={"l1_scale": scales, "masks": masks})


def _dare(tensors: list[torch.Tensor], base: torch.Tensor | None,
          params: DareParams, consensus: str | None) -> torch.Tensor:
    assert base is not None
    if params.l1_scale is None:
        params = prepare_random_sparse(lambda: [(tensors, base, params.offset)], params)
    return _sparse_merge(tensors, base, params, _random_sparsifier(params), consensus)


@register("dare_linear", DareParams, base="required", shape_policy="base", random=True,
          elementwise=True, prepare=prepare_random_sparse)
def dare_linear(tensors: list[torch.Tensor], base: torch.Tensor | None, params: DareParams):
    """DARE (linear)

    https://arxiv.org/abs/2311.03099
    """
    return _dare(tensors, base, params, None)


@register("dare_ties", DareTiesParams, base="required", shape_policy="base", random=True,
          elementwise=True, prepare=prepare_random_sparse)
def dare_ties(tensors: list[torch.Tensor], base: torch.Tensor | None, params: DareTiesParams):
    """DARE (with TIES sign consensus)

    https://arxiv.org/abs/2311.03099
    """
    return _dare(tensors, base, params, params.consensus)


def _breadcrumbs(tensors: list[torch.Tensor], base: torch.Tensor | None,
                 params: BreadcrumbsParams, consensus: str | None) -> torch.Tensor:
    return _sparse_merge(tensors, base, params,
                         lambda d, p, i: (keep_magnitude_band(d, p, params.gamma[i]), p),
                         consensus)


@register("breadcrumbs", BreadcrumbsParams, base="required", shape_policy="base")
def breadcrumbs(tensors: list[torch.Tensor], base: torch.Tensor | None,
                params: BreadcrumbsParams):
    """Model Breadcrumbs

    https://arxiv.org/abs/2312.06795
    """
    return _breadcrumbs(tensors, base, params, None)


@register("breadcrumbs_ties", BreadcrumbsTiesParams, base="required", shape_policy="base")
def breadcrumbs_ties(tensors: list[torch.Tensor], base: torch.Tensor | None,
                     params: BreadcrumbsTiesParams):
    """Model Breadcrumbs (with TIES sign consensus)

    https://arxiv.org/abs/2312.06795
    """
    return _breadcrumbs(tensors, base, params, params.consensus)


def _della(tensors: list[torch.Tensor], base: torch.Tensor | None,
           params: DellaLinearParams, consensus: str | None) -> torch.Tensor:
    return _dare(tensors, base, params, consensus)


@register("della", DellaParams, base="required", shape_policy="base", random=True,
          elementwise=True, prepare=prepare_random_sparse)
def della(tensors: list[torch.Tensor], base: torch.Tensor | None, params: DellaParams):
    """DELLA (with TIES sign consensus)

    https://arxiv.org/abs/2406.11617
    """
    return _della(tensors, base, params, params.consensus)


@register("della_linear", DellaLinearParams, base="required", shape_policy="base", random=True,
          elementwise=True, prepare=prepare_random_sparse)
def della_linear(tensors: list[torch.Tensor], base: torch.Tensor | None,
                 params: DellaLinearParams):
    """DELLA (linear)

    https://arxiv.org/abs/2406.11617
    """
    return _della(tensors, base, params, None)
