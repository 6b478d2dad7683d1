from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pydantic import Field

from mergekit.methods.gram import GramParams, gram_prepare
from mergekit.methods.registry import PerModelFloat, register
from mergekit.methods.task_vectors import sum_in_order

if TYPE_CHECKING:
    import torch


class MultiSlerpParams(GramParams):
    weight: PerModelFloat = Field(1.0, description="weight of this model in the mean")
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, description="guards the divisions by norms")


# the Gram matrix of the vectors (task vectors with a base), summed over row chunks
prepare_multislerp = gram_prepare(deltas=True)


@register("multislerp", MultiSlerpParams, base="optional", min_models=1, elementwise=True,
          prepare=prepare_multislerp, arrays=True)
def multislerp(tensors: list[torch.Tensor], base: torch.Tensor | None,
               params: MultiSlerpParams):
    """Multi-SLERP (weighted spherical mean of several models)

    Unit vectors u_i = x_i / (|x_i| + eps) of the inputs (task vectors when a base is
    given); m = normalised sum of w_i u_i; tangent = sum of w_i (u_i - (u_i . m) m); one
    exponential step from m along it; scaled by the weighted mean norm. The norms and dot
    products are those of the whole tensor (from its Gram matrix), the rest elementwise.
    """
    if len(tensors) == 1:
        return tensors[0]
    if params.gram is None:
        params = prepare_multislerp(lambda: [(tensors, base)], params)
    assert params.gram is not None
    eps = params.eps
    n = len(tensors)
    gram = params.gram_rows()
    weights = list(params.weight)
    if params.normalize_weights:
        total = sum(weights)
        weights = [w / (total if total != 0 else 1.0) for w in weights]
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]
    coef = [w / (norm + eps) for w, norm in zip(weights, norms)]  # mean = sum coef_i v_i
    mean_norm = math.sqrt(max(sum(coef[i] * coef[j] * gram[i][j]
                                  for i in range(n) for j in range(n)), 0.0))
    vectors = [x - base for x in tensors] if base is not None else tensors
    if mean_norm < eps:  # the directions cancel: no sphere point to start from
        out = sum_in_order(w * v for w, v in zip(weights, vectors))
        return out + base if base is not None else out
    # u_i . m, and the tangent's squared length, from the Gram matrix
    along = [sum(coef[j] * gram[i][j] for j in range(n)) / ((norms[i] + eps) * mean_norm)
             for i in range(n)]
    tangent_coef = [weights[i] / (norms[i] + eps) for i in range(n)]
    shift = sum(w * a for w, a in zip(weights, along))  # tangent = sum t_i v_i - shift m
    m_coef = [c / mean_norm for c in coef]  # m = sum m_i v_i
    t_coef = [t - shift * mc for t, mc in zip(tangent_coef, m_coef)]
    length = math.sqrt(max(sum(t_coef[i] * t_coef[j] * gram[i][j]
                               for i in range(n) for j in range(n)), 0.0)) + eps
    scale = sum(w * norm for w, norm in zip(weights, norms))
    mix = [scale * (math.cos(length) * mc + math.sin(length) / length * tc)
           for mc, tc in zip(m_coef, t_coef)]
    out = sum_in_order(c * v for c, v in zip(mix, vectors))
    return out + base if base is not None else out
