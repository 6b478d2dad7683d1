"""Steps shared by the task-arithmetic family: sparsifying task vectors (by magnitude, at
random, by magnitude band, by rank-based probability), L1 rescaling, sign election and the
weighted combination."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from mergekit.methods.random_stream import uniform

if TYPE_CHECKING:
    import numpy as np
    import torch


# -- sparsification ------------------------------------------------------------------


def top_count(density: float, numel: int) -> int:
    """Entries a magnitude sparsifier keeps: at least one, as the established tool."""
    return max(1, int(density * numel))


def kth_largest_magnitudes(
    chunks: Callable[[], Iterable[list[torch.Tensor]]], densities: Sequence[float]
) -> list[float]:
    """For each of several tensors streamed together as re-iterable row chunks, the
    k-th largest |value| with k = top_count(densities[i], numel): the smallest magnitude
    a magnitude sparsifier keeps."""
    import torch

    found = magnitude_ranks(chunks, [lambda n, d=d: [top_count(d, n)] for d in densities])
    return [float(torch.tensor([pattern], dtype=torch.int32).view(torch.float32))
            for ((pattern, _),) in found]


def magnitude_ranks(
    chunks: Callable[[], Iterable[list[torch.Tensor]]],
    ranks_of: Sequence[Callable[[int], Sequence[int]]],
    nonzero: bool = False,
) -> list[list[tuple[int, int]]]:
    """For each tensor streamed by ``chunks`` (re-iterable row chunks of several tensors
    together) and each k in ``ranks_of[i](numel)`` (1 <= k <= numel): the float32 bit
    pattern of its k-th largest |value| (see ``magnitude_bits``) and how many entries are
    strictly larger. With ``nonzero``, ``ranks_of[i]`` is given the count of its nonzero
    entries instead of numel (counted in the same pass).

    Radix selection on the float32 bit patterns (monotonic for non-negative floats): one
    pass counts the high 16 bits, a second the low 16 bits inside the buckets holding the
    k-th values. Memory is one chunk; the result is exact and independent of chunking.
    """
    import torch

    def count_from_top(hist: torch.Tensor) -> torch.Tensor:  # entries in buckets >= b
        return torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])

    n = len(ranks_of)
    high = torch.zeros((n, 1 << 15), dtype=torch.int64)
    zeros = [0] * n
    for parts in chunks():
        for i, chunk in enumerate(parts):
            bits = magnitude_bits(chunk)
            high[i] += torch.bincount((bits >> 16).cpu(), minlength=1 << 15)
            if nonzero:
                zeros[i] += int((bits == 0).sum())
    # per tensor, per rank: (bucket, entries above the bucket, rank within the bucket)
    wanted: list[list[tuple[int, int, int]]] = []
    for i in range(n):
        above = count_from_top(high[i])
        wanted.append([])
        for k in ranks_of[i](int(high[i].sum()) - zeros[i]):
            bucket = int(torch.nonzero(above >= k).max())
            over = int(above[bucket + 1]) if bucket + 1 < len(above) else 0
            wanted[i].append((bucket, over, k - over))
    low = [{bucket: torch.zeros(1 << 16, dtype=torch.int64) for bucket, _, _ in w}
           for w in wanted]
    for parts in chunks() if any(low) else ():
        for i, chunk in enumerate(parts):
            bits = magnitude_bits(chunk)
            for bucket, hist in low[i].items():
                hist += _bucket_histogram(bits, bucket)
    out = []
    for i in range(n):
        out.append([])
        for bucket, over, need in wanted[i]:
            in_bucket = count_from_top(low[i][bucket])
            lo = int(torch.nonzero(in_bucket >= need).max())
            larger = over + (int(in_bucket[lo + 1]) if lo + 1 < len(in_bucket) else 0)
            out[i].append(((bucket << 16) | lo, larger))
    return out


def _bucket_histogram(bits: torch.Tensor, bucket: int) -> torch.Tensor:
    """Counts of the low 16 bits of the ``bits`` whose high 16 bits are ``bucket``. In host
    memory numpy selects them (faster than torch's boolean indexing; the same counts)."""
    import torch

    if bits.device.type != "cpu":
        inside = (bits[(bits >> 16) == bucket] & 0xFFFF).to(torch.int64).cpu()
        return torch.bincount(inside, minlength=1 << 16)
    import numpy as np

    flat = bits.numpy()
    inside = flat[(flat >> 16) == bucket] & 0xFFFF
    return torch.from_numpy(np.bincount(inside, minlength=1 << 16))


# The last entry ranked in among the largest magnitudes: its bit pattern
# (``magnitude_bits``) and how many entries equal to it rank in (in index order); None when
# no entry does.
Edge = tuple[int, int] | None


def ranked_first(bits: torch.Tensor, edge: Edge, equal_before: int) -> torch.Tensor:
    """Bool mask of a row chunk's entries (their ``magnitude_bits``) ranked up to ``edge``:
    larger than its magnitude, or equal to it and among the first that rank in, of which
    ``equal_before`` came in earlier chunks."""
    import torch

    if edge is None:
        return torch.zeros(bits.shape, dtype=torch.bool, device=bits.device)
    last, equal_in = edge
    mask = bits > last
    if equal_in > equal_before:
        mask[torch.nonzero(bits == last).reshape(-1)[:equal_in - equal_before]] = True
    return mask


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns of |x|, flat, as int32: their order is the magnitudes'
    order (NaN above infinity)."""
    import torch

    return x.abs().to(torch.float32).reshape(-1).view(torch.int32)


def keep_top_magnitude(delta: torch.Tensor, density: float,
                       floor: float | None = None) -> torch.Tensor:
    """Keep the max(1, int(density * numel)) entries of largest magnitude (entries tied
    with the last one kept are kept too); ``floor`` is that magnitude when known."""
    if density >= 1.0:
        return delta
    if floor is None:
        (floor,) = kth_largest_magnitudes(lambda: [[delta]], [density])
    if not floor > 0.0:  # every |x| >= 0
        return delta
    # hardshrink keeps |x| > lambd, so the float32 just below floor keeps |x| >= floor;
    # one fused op, where a bool mask and a multiply cost far more on CPU
    return delta.hardshrink(float32_below(floor))


def float32_below(x: float) -> float:
    """The largest float32 smaller than the positive float32 ``x``."""
    (bits,) = struct.unpack("<i", struct.pack("<f", x))
    (below,) = struct.unpack("<f", struct.pack("<i", bits - 1))
    return below


def below_mask(draw: torch.Tensor, limit: torch.Tensor | float) -> torch.Tensor:
    """1.0 where draw < limit, else 0.0, as float32 arithmetic: the sign of a difference is
    exact, and float ops are several times faster than a bool mask on CPU."""
    import torch

    return torch.sub(limit, draw).sign_().clamp_(min=0.0)


def random_mask(delta: torch.Tensor, limit: torch.Tensor | float, seed: int, stream: int,
                offset: int) -> torch.Tensor:
    """1.0 where an entry is kept (its draw is below ``limit``, a keep probability per
    entry or for all), else 0.0: DARE with the density as limit, DELLA with its ranks."""
    draw = uniform(delta.numel(), seed, stream, offset).reshape(delta.shape)
    return below_mask(draw.to(device=delta.device), limit)


def pack_mask(mask: torch.Tensor) -> np.ndarray:
    """A 0/1 mask at one bit per entry (the draws it came from cost far more to repeat)."""
    import numpy as np
    import torch

    return np.packbits(mask.reshape(-1).to("cpu", torch.bool).numpy())


def unpack_mask(packed: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """The mask ``pack_mask`` packed, as 0.0/1.0 of ``like``'s shape, dtype and device."""
    import numpy as np
    import torch

    bits = torch.from_numpy(np.unpackbits(packed, count=like.numel()))
    return bits.to(device=like.device, dtype=like.dtype).reshape(like.shape)


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per row, keep probability (density - eps) + 2 eps * (magnitude rank in [0, 1])."""
    import torch

    rows = delta.reshape(-1, delta.shape[-1]) if delta.dim() > 0 else delta.reshape(1, 1)
    n = rows.shape[-1]
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=-1, stable=True), dim=-1)
    position = ranks.to(delta.dtype) / (n - 1) if n > 1 else torch.full_like(rows, 0.5)
    return ((density - epsilon) + 2.0 * epsilon * position).reshape(delta.shape)


def rescale_l1(original: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Scale ``kept`` so its L1 norm equals the original's (no-op when nothing is kept)."""
    before = float(original.abs().sum())
    after = float(kept.abs().sum())
    return kept * (before / after) if after > 0 else kept


# -- merging -------------------------------------------------------------------------


def sum_in_order(xs: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of same-shape tensors (the models'), added in order into a new tensor: the bits
    of torch's sum or mean over a stacked models' dimension, without the stacked copy,
    and several times faster for a few models. numpy arrays too."""
    it = iter(xs)
    out = next(it)
    second = next(it, None)
    if second is None:  # a copy: torch's clone, numpy's copy
        return out.clone() if hasattr(out, "clone") else out.copy()
    out = out + second
    for x in it:
        out += x
    return out



def combine(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: str | None,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """base + lambda * (sum of weighted, optionally sign-agreeing deltas [/ their weights]).

    Consumes ``deltas`` (they are scaled in place: pass tensors of your own). Works model
    by model on tensors of the base's shape (no stacked copies), in float arithmetic
    rather than bool masks and ``where`` (several times slower on CPU), since this runs
    on every chunk of every tensor.
    """
    import torch

    # the weights as float32 values, as the math is done in
    weights32 = torch.tensor(list(weights), dtype=torch.float32)
    w = weights32.tolist()
    weighted = [d.mul_(w[i]) for i, d in enumerate(deltas)]
    mixed = torch.zeros_like(base)
    if consensus is None:
        for wd in weighted:
            mixed += wd
        total = float(weights32.sum())
        if normalize:
            mixed /= total if total != 0 else 1.0
    else:
        votes = torch.zeros_like(base)  # starts at +0.0, so a tie is never -0.0
        for wd in weighted:
            votes += wd if consensus == "sum" else torch.sign(wd)
        elected = torch.copysign(torch.ones((), device=base.device), votes)  # ties: +1
        del votes
        divisor = torch.zeros_like(base) if normalize else None
        for i, wd in enumerate(weighted):
            # |wd| where wd has the elected sign, else 0 (zeros never agree)
            agreeing = wd.mul_(elected).clamp_(min=0.0)
            mixed.addcmul_(agreeing, elected)
            if divisor is not None:
                divisor.add_(agreeing.sign_(), alpha=w[i])  # + w[i] where it agrees
        if divisor is not None:
            # 1 where nothing agreed (|divisor| is 0), so those entries stay as they are
            divisor += divisor.abs().sign_().neg_().add_(1.0)
            mixed /= divisor
    if lambda_ != 1.0:
        mixed *= lambda_
    return mixed.add_(base)
