"""DARE and DELLA: the task-arithmetic family's random sparsifiers. Each task vector keeps
every entry with a probability (the density; for DELLA one per entry, from its magnitude
rank) drawn from position-addressed random streams, then is rescaled and combined like
the rest of the family (``task_arithmetic.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from mergekit.methods.registry import PerModelFloat, RandomParams, prepared, register
from mergekit.methods.task_arithmetic import (
    Consensus,
    RescaleMode,
    check_density,
    consensus_field,
    density_field,
    int8_mask_field,
    lambda_field,
    sparse_merge,
    weight_field,
)
from mergekit.methods.task_vectors import (
    della_probabilities,
    pack_mask,
    random_mask,
    unpack_mask,
)

if TYPE_CHECKING:
    import torch


# -- parameters ----------------------------------------------------------------------


class DareParams(RandomParams):
    weight: PerModelFloat = weight_field()
    density: PerModelFloat = density_field()
    normalize: bool = Field(False, description="divide by the summed weights")
    rescale: bool = Field(True, description="rescale the kept entries after dropping")
    rescale_mode: RescaleMode = Field(
        "l1", description="l1: keep each task vector's L1 norm; inverse_density: divide by "
        "the keep probability (the DARE paper)")
    lambda_: float = lambda_field()
    int8_mask: bool = int8_mask_field()
    # Set by prepare_random_sparse: per model, the whole tensor's L1 rescale factor.
    l1_scale: tuple[float, ...] | None = prepared()
    # Set by prepare_random_sparse: the keep masks it drew, packed, by (offset, model), so
    # the merge pass does not draw them again.
    masks: dict[tuple[int, int], Any] | None = prepared()

    @model_validator(mode="after")
    def _densities(self) -> DareParams:
        check_density(self.density)
        return self


class DareTiesParams(DareParams):
    consensus: Consensus = consensus_field()


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
    consensus: Consensus = consensus_field()


# -- the methods -----------------------------------------------------------------------


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
                magnitude = delta.abs()  # |delta * mask| = |delta| * mask: the same sums
                totals[i, 0] += magnitude.sum(dtype=torch.float64).cpu()
                totals[i, 1] += magnitude.mul_(mask).sum(dtype=torch.float64).cpu()
                masks[(offset, i)] = pack_mask(mask)
    scales = tuple(float(a / b) if b > 0 else 1.0 for a, b in totals.tolist())
    return params.model_copy(update={"l1_scale": scales, "masks": masks})


def _dare(tensors: list[torch.Tensor], base: torch.Tensor | None,
          params: DareParams, consensus: str | None) -> torch.Tensor:
    assert base is not None
    if params.l1_scale is None:
        params = prepare_random_sparse(lambda: [(tensors, base, params.offset)], params)
    return sparse_merge(tensors, base, params, _random_sparsifier(params), consensus)


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
