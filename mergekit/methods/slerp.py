from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pydantic import Field

from mergekit.methods.registry import MethodParams, register

if TYPE_CHECKING:
    import torch

# Above this |cosine| the two vectors are treated as colinear and interpolated linearly.
COLINEAR_COSINE = 0.9995
NORM_EPS = 1e-8


class SlerpParams(MethodParams):
    t: float = Field(description="interpolation position: 0 gives the base model, 1 the other")


@register("slerp", SlerpParams, base="required", min_models=1, max_models=1)
def slerp(tensors: list[torch.Tensor], base: torch.Tensor | None, params: SlerpParams):
    """SLERP (spherical linear interpolation)

    https://en.wikipedia.org/wiki/Slerp
    """
    import torch

    assert base is not None
    (other,) = tensors
    t = params.t
    a = base.reshape(-1)
    b = other.reshape(-1)
    norm_a = float(torch.linalg.vector_norm(a))
    norm_b = float(torch.linalg.vector_norm(b))
    dot = float(torch.dot(a, b))
    # cosine of the normalised vectors; a zero-norm vector stays unnormalised (cosine 0)
    cos = dot / ((norm_a if norm_a > NORM_EPS else 1.0) * (norm_b if norm_b > NORM_EPS else 1.0))
    if abs(cos) > COLINEAR_COSINE:
        return torch.lerp(base, other, t)
    theta = math.acos(max(-1.0, min(1.0, cos)))
    sin_theta = math.sin(theta)
    s_base = math.sin((1.0 - t) * theta) / sin_theta
    s_other = math.sin(t * theta) / sin_theta
    return base * s_base + other * s_other
