from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from pydantic import Field

from mergekit.methods.gram import summed_gram
from mergekit.methods.registry import MethodParams, PerModelFloat, prepared, register
from mergekit.methods.slerp import NUSLERP_MIN_SIN2, slerp_coefficients

if TYPE_CHECKING:
    import torch

class NuSlerpParams(MethodParams):
    weight: PerModelFloat = Field(description="relative weight; t = w2 / (w1 + w2)")
    nuslerp_flatten: bool = Field(True, description="treat each tensor as one vector")
    nuslerp_row_wise: bool = Field(
        False, description="when not flattening: false interpolates each row W[i, :], "
        "true each column W[:, j] (the established tool's convention)"
    )
    # Set by prepare_nuslerp for a tensor treated as one vector: (|a|^2, |b|^2, a . b) of
    # the whole tensor, so row chunks are interpolated with the whole tensor's angle.
    sums: tuple[float, float, float] | None = prepared()
    # Set by prepare_nuslerp for columns: a (3, columns) float64 tensor of each column's
    # (|a|^2, |b|^2, a . b) over the whole tensor.
    column_sums: Any = prepared()


def _vector_coefficients(sums: torch.Tensor, t: float, device: torch.device
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vector float32 (s_a, s_b) on ``device`` from a (3, vectors) float64 tensor of
    |a|^2, |b|^2 and a . b (see ``slerp_coefficients``)."""
    import torch

    s_a, s_b, _ = slerp_coefficients(*sums.cpu().numpy(), t, NUSLERP_MIN_SIN2)
    return torch.from_numpy(s_a).float().to(device), torch.from_numpy(s_b).float().to(device)


def _task_vectors(tensors: list[torch.Tensor], base: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = tensors
    return (a - base, b - base) if base is not None else (a, b)


def _one_vector(params: NuSlerpParams, a: torch.Tensor) -> bool:
    return params.nuslerp_flatten or a.ndim < 2


def _column_sums(a: torch.Tensor, b: torch.Tensor, carry: torch.Tensor | None) -> torch.Tensor:
    """(3, columns) float64: |a|^2, |b|^2 and a . b of each column W[:, j] of a row chunk,
    added to ``carry`` (the rows before it). The products are exact in float64 and are
    added one row after another, so the sums do not depend on how the rows are chunked
    (a sum over the chunk's rows first would round differently for each chunking)."""
    import torch

    rows = a.shape[0]
    a64, b64 = a.reshape(rows, -1).double(), b.reshape(rows, -1).double()
    prods = torch.stack([a64 * a64, b64 * b64, a64 * b64], dim=1)  # (rows, 3, columns)
    total = carry.clone() if carry is not None else torch.zeros_like(prods[0])
    for row in prods.unbind(0):  # several times faster than a cumsum down the rows
        total.add_(row)
    return total


def prepare_nuslerp(
    chunks: Callable[[], Iterable[tuple[list[torch.Tensor], torch.Tensor | None]]],
    params: NuSlerpParams,
) -> NuSlerpParams:
    """For a tensor treated as one vector: (|a|^2, |b|^2, a . b) of the whole tensor (see
    ``summed_gram``); for columns, the same per column (see ``_column_sums``). Rows are
    interpolated on their own and need nothing."""
    xs, *_ = next(iter(chunks()))
    if _one_vector(params, xs[0]):  # the task vectors have the inputs' shape
        gram = summed_gram(chunks(), deltas=True)  # of the task vectors, given a base
        return params.model_copy(update={"sums": (float(gram[0, 0]), float(gram[1, 1]),
                                                  float(gram[0, 1]))})
    if not params.nuslerp_row_wise:
        return params
    columns = None
    for xs, base, *_ in chunks():
        columns = _column_sums(*_task_vectors(xs, base), columns)
    return params.model_copy(update={"column_sums": columns})


@register("nuslerp", NuSlerpParams, base="optional", min_models=2, max_models=2,
          elementwise=True, prepare=prepare_nuslerp,
          arrays=lambda params: params.nuslerp_flatten)
def nuslerp(tensors: list[torch.Tensor], base: torch.Tensor | None, params: NuSlerpParams):
    """NuSLERP (slerp by weights, of task vectors when a base is given)

    Interpolates the whole tensor as one vector, or each row, or each column; norms and
    angles of columns are summed over the whole tensor's rows."""
    w1, w2 = params.weight
    total = w1 + w2
    t = w2 / total if total != 0 else 0.5
    a, b = _task_vectors(tensors, base)
    shape = a.shape
    if _one_vector(params, a):
        if params.sums is None:
            params = prepare_nuslerp(lambda: [(tensors, base)], params)
        assert params.sums is not None
        s_a, s_b, _ = slerp_coefficients(*params.sums, t, NUSLERP_MIN_SIN2)
        out = a * float(s_a)
        out += b * float(s_b)  # no fused multiply-add: numpy arrays get the same bits
    else:
        import torch

        a2, b2 = a.reshape(shape[0], -1), b.reshape(shape[0], -1)
        if not params.nuslerp_row_wise:  # rows W[i, :]: row-local
            # per-row float32 dot products (torch: this mode stays on torch)
            sums = torch.stack([torch.linalg.vecdot(x, y).double()
                                for x, y in ((a2, a2), (b2, b2), (a2, b2))])
            ca, cb = (c.unsqueeze(-1) for c in _vector_coefficients(sums, t, a.device))
        else:  # columns W[:, j]: vectors along the first dimension
            if params.column_sums is None:
                params = prepare_nuslerp(lambda: [(tensors, base)], params)
            ca, cb = _vector_coefficients(params.column_sums, t, a.device)
        out = (a2 * ca).add_(b2 * cb).reshape(shape)
    return out + base if base is not None else out
