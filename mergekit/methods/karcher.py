from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pydantic import Field

from mergekit.methods.gram import GramParams, gram_prepare
from mergekit.methods.registry import PerModelFloat, register

if TYPE_CHECKING:
    import torch


EPS = 1e-8
# The fixed point converges in tens of iterations to float64's precision, even from
# near-orthogonal inputs; below that precision (a tiny tol) it never stops early, so the
# cap bounds a tensor's cost.
MAX_ITER = 1000


class KarcherParams(GramParams):
    weight: PerModelFloat = Field(1.0, description="weight of this model in the mean")
    max_iter: int = Field(10, ge=0, le=MAX_ITER, description="most iterations of the "
                          f"mean's fixed point (at most {MAX_ITER})")
    tol: float = Field(1e-5, gt=0, description="stop when the tangent step is shorter "
                       "than this (above 0)")


_gram_of_points = gram_prepare(deltas=False)


def prepare_karcher(chunks, params):  # type: ignore[no-untyped-def]
    """The Gram matrix of the points, summed over row chunks: the inputs, and the base
    model as one more point when there is one (as mergekit 0.1.x averages it in)."""
    def points():  # type: ignore[no-untyped-def]
        for xs, base, *rest in chunks():
            yield (list(xs) + ([base] if base is not None else []), None, *rest)

    return _gram_of_points(points, params)


def _quad(gram: list[list[float]], a: list[float], b: list[float]) -> float:
    """a^T G b: the dot product of sum a_i u_i and sum b_i u_i."""
    return sum(a[i] * gram[i][j] * b[j] for i in range(len(a)) for j in range(len(b)))


def karcher_coefficients(gram: list[list[float]], weights: list[float], max_iter: int,
                         tol: float) -> list[float]:
    """Coefficients c with mean = sum c_i x_i, from the inputs' Gram matrix.

    Every point of the iteration (the chord mean, the tangent of the log maps, the
    exponential step) is a combination of the unit vectors u_i = x_i / |x_i|, so it runs
    on their Gram matrix: u_i . m = (G c)_i and |m|^2 = c^T G c."""
    n = len(weights)
    total = sum(weights)
    w = [x / (total if total != 0 else 1.0) for x in weights]
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]
    live = [i for i in range(n) if norms[i] > EPS]
    if not live:
        return [0.0] * n
    g = [[gram[i][j] / (norms[i] * norms[j]) for j in live] for i in live]  # unit vectors
    wl = [w[i] for i in live]
    k = len(live)
    c = list(wl)  # the chord mean, normalised; the first direction if it vanishes
    length = math.sqrt(max(_quad(g, c, c), 0.0))
    c = [x / length for x in c] if length > EPS else [1.0] + [0.0] * (k - 1)
    w_live = max(sum(wl), EPS)
    for _ in range(max_iter):
        cos = [max(-1.0, min(1.0, sum(g[i][j] * c[j] for j in range(k)))) for i in range(k)]
        pull = []  # w_i theta_i / sin theta_i: the tangent is sum pull_i (u_i - cos_i m)
        for i in range(k):
            theta = math.acos(cos[i])
            sin = math.sin(theta)
            pull.append(wl[i] * (theta / sin if sin > EPS else 1.0))
        along = sum(p * cs for p, cs in zip(pull, cos))
        tangent = [(p - along * cj) / w_live for p, cj in zip(pull, c)]
        step = math.sqrt(max(_quad(g, tangent, tangent), 0.0))
        if step < tol:
            break
        if step > EPS:
            c = [math.cos(step) * cj + math.sin(step) * tj / step for cj, tj in zip(c, tangent)]
        length = max(math.sqrt(max(_quad(g, c, c), 0.0)), EPS)
        c = [x / length for x in c]
    scale = sum(wi * ni for wi, ni in zip(w, norms))  # the weighted mean norm
    out = [0.0] * n
    for cj, i in zip(c, live):
        out[i] = scale * cj / norms[i]
    return out


@register("karcher", KarcherParams, base="optional", min_models=1, elementwise=True,
          prepare=prepare_karcher, arrays=True)
def karcher(tensors: list[torch.Tensor], base: torch.Tensor | None, params: KarcherParams):
    """Karcher mean (Riemannian mean on the sphere)

    https://en.wikipedia.org/wiki/Karcher_mean

    The directions of the whole tensors (unit vectors) are averaged on the sphere by a
    fixed-point iteration from their normalised weighted sum; the mean direction is
    scaled by the weighted mean of their norms. Norms and angles are those of the whole
    tensor (from its Gram matrix), so the result is a weighted sum of the inputs. A base
    model is one more point, of weight 1, as in mergekit 0.1.x.
    """
    if params.gram is None:
        params = prepare_karcher(lambda: [(tensors, base)], params)
    assert params.gram is not None
    points = list(tensors) + ([base] if base is not None else [])
    weights = list(params.weight) + ([1.0] if base is not None else [])  # the base: 1
    coef = karcher_coefficients(params.gram_rows(), weights, params.max_iter, params.tol)
    out = points[0] * coef[0]
    for c, x in zip(coef[1:], points[1:]):
        out += x * c  # no fused multiply-add: numpy arrays get the same bits
    return out
