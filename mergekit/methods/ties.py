from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from mergekit.methods.registry import MethodParams, PerModelFloat, register

if TYPE_CHECKING:
    import torch


class TiesParams(MethodParams):
    weight: PerModelFloat = Field(description="weight of this model's task vector")
    density: PerModelFloat = Field(
        1.0, description="fraction of the task vector's entries kept, by magnitude"
    )
    normalize: bool = Field(
        True, description="divide by the summed weights of the models that agree on the sign"
    )
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged task vector")
    int8_mask: bool = Field(False, description="store masks as int8 (accepted; no effect)")
    consensus: Literal["sum", "count"] = Field(
        "sum",
        description="sign election: sign of the weighted sum, or the majority of signs",
    )


def keep_top_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the int(density * numel) entries of largest magnitude."""
    import torch

    if density >= 1.0:
        return delta
    flat = delta.reshape(-1)
    k = int(density * flat.numel())
    if k <= 0:
        return torch.zeros_like(delta)
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=delta.device)
    keep[torch.topk(flat.abs(), k, sorted=False).indices] = True
    return (flat * keep).reshape(delta.shape)


def elect_sign_mask(weighted: torch.Tensor, consensus: str) -> torch.Tensor:
    """Mask of entries whose sign agrees with the elected sign.

    ``weighted``: (n_models, ...) weighted task vectors. Zero entries never agree.
    """
    import torch

    signs = torch.sign(weighted)
    votes = weighted.sum(dim=0) if consensus == "sum" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(weighted.dtype)
    return signs == elected


@register("ties", TiesParams, base="required", shape_policy="base")
def ties(tensors: list[torch.Tensor], base: torch.Tensor | None, params: TiesParams):
    """TIES

    https://arxiv.org/abs/2306.01708
    """
    import torch

    assert base is not None
    deltas = torch.stack(
        [keep_top_magnitude(x - base, d) for x, d in zip(tensors, params.density)]
    )  # (n_models, *shape)
    weights = torch.tensor(params.weight, dtype=deltas.dtype, device=deltas.device)
    weights = weights.reshape(-1, *([1] * base.dim()))
    weighted = deltas * weights
    agree = elect_sign_mask(weighted, params.consensus)
    mixed = (weighted * agree).sum(dim=0)
    if params.normalize:
        divisor = (weights * agree).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        mixed = mixed / divisor
    return base + params.lambda_ * mixed
