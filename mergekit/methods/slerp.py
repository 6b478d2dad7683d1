from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from pydantic import Field

from mergekit.methods.gram import summed_gram
from mergekit.methods.registry import MethodParams, prepared, register

if TYPE_CHECKING:
    import torch

# Above this |cosine| the two vectors are treated as colinear and interpolated linearly.
COLINEAR_COSINE = 0.9995
NORM_EPS = 1e-8


class SlerpParams(MethodParams):
    t: float = Field(description="interpolation position: 0 gives the base model, 1 the other")
    # Set by prepare_slerp: (|base|^2, |other|^2, base . other) over the whole tensor, so
    # row chunks are combined with the whole tensor's angle.
    sums: tuple[float, float, float] | None = prepared()


def prepare_slerp(
    chunks: Callable[[], Iterable[tuple[list[torch.Tensor], torch.Tensor]]],
    params: SlerpParams,
) -> SlerpParams:
    """(|base|^2, |other|^2, base . other) of the whole tensor (see ``summed_gram``)."""
    gram = summed_gram((([base, other], None) for (other,), base, *_ in chunks()),
                       deltas=False)
    return params.model_copy(update={"sums": (float(gram[0, 0]), float(gram[1, 1]),
                                              float(gram[0, 1]))})


@register("slerp", SlerpParams, base="required", min_models=1, max_models=1, elementwise=True,
          prepare=prepare_slerp, light_prepare=True, keeps_nonfinite=True, arrays=True)
def slerp(tensors: list[torch.Tensor], base: torch.Tensor | None, params: SlerpParams):
    """SLERP (spherical linear interpolation)

    https://en.wikipedia.org/wiki/Slerp
    """
    assert base is not None
    (other,) = tensors
    if params.sums is None:
        params = prepare_slerp(lambda: [(tensors, base)], params)
    assert params.sums is not None
    coefficients = slerp_coefficients(params.sums, params.t)
    if coefficients is None:
        return lerp(base, other, params.t)
    s_base, s_other = coefficients
    out = base * s_base
    out += other * s_other
    return out


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """a + t (b - a), from the nearer end (as ``torch.lerp``): exactly a at t = 0 and b at
    t = 1. Every operation rounded, for tensors and arrays alike."""
    diff = b - a
    if t < 0.5:
        diff *= t
        diff += a
        return diff
    diff *= 1.0 - t
    return b - diff


def slerp_coefficients(sums: tuple[float, float, float], t: float) -> tuple[float, float] | None:
    """(s_a, s_b) with slerp(a, b, t) = s_a a + s_b b, from (|a|^2, |b|^2, a . b); None
    where the vectors are (nearly) colinear or an input is not finite: there is no angle,
    and a linear interpolation keeps the other elements finite."""
    aa, bb, ab = sums
    norm_a, norm_b = math.sqrt(max(aa, 0.0)), math.sqrt(max(bb, 0.0))
    # cosine of the normalised vectors; a zero-norm vector stays unnormalised (cosine 0)
    cos = ab / ((norm_a if norm_a > NORM_EPS else 1.0) * (norm_b if norm_b > NORM_EPS else 1.0))
    if not math.isfinite(cos) or abs(cos) > COLINEAR_COSINE:
        return None
    theta = math.acos(max(-1.0, min(1.0, cos)))
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta
