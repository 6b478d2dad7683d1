"""A weight difference as the product of two thin factors, by truncated SVD (the best
approximation of its rank in the Frobenius norm, Eckart-Young)."""

from __future__ import annotations

import numpy as np

# The randomized SVD is used only for a large matrix and a small rank: below these its
# saving is small, and with OVERSAMPLE and POWER_ITERATIONS its error stays within 1% of the
# exact truncated SVD's on decaying and flat spectra (tests/test_lora_factor.py).
RANDOMIZED_MIN_SIDE = 1024
RANDOMIZED_MAX_FRACTION = 8  # rank + oversampling at most min(rows, cols) / 8
POWER_ITERATIONS = 6
# sampled columns beyond the rank: the larger of these
OVERSAMPLE_MIN, OVERSAMPLE_FACTOR = 16, 1
# matrices up to this many elements are decomposed in float64: cheap, and exact to ~1e-12
FLOAT64_MAX_ELEMENTS = 1 << 22


def factorize(delta: np.ndarray, max_rank: int, sv_epsilon: float = 0.0,
              distribute_scale: bool = True, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 factors ``A`` (r, in) and ``B`` (out, r) with ``delta`` (out, in) ≈ ``B @ A``:
    the top r ≤ ``max_rank`` singular triplets whose singular value exceeds ``sv_epsilon``
    (r may be 0). ``distribute_scale``: A = sqrt(S) Vt, B = U sqrt(S); else A = Vt (rows
    orthonormal), B = U S. ``seed`` fixes the randomized SVD's sample."""
    if delta.ndim != 2:
        raise ValueError(f"factorize: expected a matrix, got shape {delta.shape}")
    if max_rank < 1:
        raise ValueError(f"factorize: max_rank {max_rank} is below 1")
    rows, cols = delta.shape
    k = min(max_rank, rows, cols)
    if k == 0:
        return np.zeros((0, cols), np.float32), np.zeros((rows, 0), np.float32)
    if uses_randomized(rows, cols, k):
        u, s, vt = _randomized_svd(np.asarray(delta, np.float32), k, seed)
    else:
        dtype = np.float64 if rows * cols <= FLOAT64_MAX_ELEMENTS else np.float32
        u, s, vt = np.linalg.svd(np.asarray(delta, dtype), full_matrices=False)
        u, s, vt = u[:, :k], s[:k], vt[:k]
    r = int(np.count_nonzero(s > sv_epsilon))  # s is sorted descending
    u, s, vt = u[:, :r], s[:r], vt[:r]
    if distribute_scale:
        root = np.sqrt(s)
        a, b = root[:, None] * vt, u * root[None, :]
    else:
        a, b = vt, u * s[None, :]
    return np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)


def uses_randomized(rows: int, cols: int, rank: int) -> bool:
    """Whether ``factorize`` takes the randomized SVD for this shape and rank."""
    side = min(rows, cols)
    return (side >= RANDOMIZED_MIN_SIDE
            and rank + _oversample(rank) <= side // RANDOMIZED_MAX_FRACTION)


def _oversample(rank: int) -> int:
    return max(OVERSAMPLE_MIN, OVERSAMPLE_FACTOR * rank)


def _randomized_svd(x: np.ndarray, k: int, seed: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k SVD of ``x`` by a random range sample refined by power iterations (Halko,
    Martinsson and Tropp 2011, algorithm 4.4), re-orthonormalized at every step so that
    float32 keeps the small singular directions."""
    transposed = x.shape[0] < x.shape[1]
    if transposed:  # sample the smaller side: the QRs are of (long side, l)
        x = x.T
    sample = k + _oversample(k)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(x @ rng.standard_normal((x.shape[1], sample), dtype=np.float32))
    for _ in range(POWER_ITERATIONS):
        w, _ = np.linalg.qr(x.T @ q)
        q, _ = np.linalg.qr(x @ w)
    small = q.T @ x  # (sample, cols)
    ub, s, vt = np.linalg.svd(small.astype(np.float64), full_matrices=False)
    u = q @ ub[:, :k].astype(np.float32)
    s, vt = s[:k].astype(np.float32), vt[:k].astype(np.float32)
    return (vt.T, s, u.T) if transposed else (u, s, vt)
