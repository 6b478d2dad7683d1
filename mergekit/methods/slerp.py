from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from mergekit.methods.gram import summed_gram
from mergekit.methods.registry import MethodParams, UsualRange, prepared, register

if TYPE_CHECKING:
    import numpy as np
    import torch

# The constants of every slerp (slerp, nuslerp): above this |cosine| two vectors are
# treated as colinear and interpolated linearly; a vector with a norm at most NORM_EPS is
# not normalised.
COLINEAR_COSINE = 0.9995
NORM_EPS = 1e-8
# nuslerp's own rule, as mergekit 0.1.x has it: linear only where 1 - cos^2 is at most this
NUSLERP_MIN_SIN2 = 1e-16


class SlerpParams(MethodParams):
    t: Annotated[float, UsualRange(0.0, 1.0, "slerp extrapolates past the models")] = Field(
        description="interpolation position: 0 gives the base model, 1 the other")
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
    s_base, s_other, linear = slerp_coefficients(*params.sums, params.t)
    if linear:
        return lerp(base, other, params.t)
    # Python floats: a float32 tensor or array times a float stays float32
    out = base * float(s_base)
    out += other * float(s_other)
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


def slerp_coefficients(aa: Any, bb: Any, ab: Any, t: float, min_sin2: float | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(s_a, s_b, linear) with slerp(a, b, t) = s_a a + s_b b, from |a|^2, |b|^2 and a . b:
    float64 numbers for one pair of vectors, or arrays of them for many pairs at once
    (nuslerp's rows and columns). ``linear`` marks the pairs that are (nearly) colinear or
    not finite: there is no angle, and s_a, s_b = 1 - t, t, a linear interpolation that
    keeps the other elements finite. Colinear is |cos| > ``COLINEAR_COSINE`` (slerp's
    rule), or with ``min_sin2`` 1 - cos^2 <= min_sin2 (nuslerp's)."""
    import numpy as np

    aa, bb, ab = (np.asarray(x, dtype=np.float64) for x in (aa, bb, ab))
    with np.errstate(all="ignore"):  # NaN and Inf sums: linear, as documented
        norm_a, norm_b = np.sqrt(np.maximum(aa, 0.0)), np.sqrt(np.maximum(bb, 0.0))
        # cosine of the normalised vectors; a zero-norm vector stays unnormalised (cosine 0)
        cos = ab / (np.where(norm_a > NORM_EPS, norm_a, 1.0)
                    * np.where(norm_b > NORM_EPS, norm_b, 1.0))
        colinear = (np.abs(cos) > COLINEAR_COSINE if min_sin2 is None
                    else 1.0 - cos * cos <= min_sin2)
        linear = ~np.isfinite(cos) | colinear
        theta = np.arccos(np.clip(np.where(linear, 0.0, cos), -1.0, 1.0))
        sin_theta = np.where(linear, 1.0, np.sin(theta))
        s_a = np.where(linear, 1.0 - t, np.sin((1.0 - t) * theta) / sin_theta)
        s_b = np.where(linear, t, np.sin(t * theta) / sin_theta)
    return s_a, s_b, linear
