"""New embedding rows as weighted sums of existing ones: orthogonal matching pursuit (the
donor's rows of a token approximated from a few shared tokens' rows), means and zeros.
Pure numpy; no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# the largest (targets, dictionary rows) block of correlations computed at once, in elements
CORRELATION_ELEMENTS = 1 << 24
MAX_BATCH_ROWS = 256
# a residual this small, relative to its target, counts as exact: pursuit stops there
RESIDUAL_TOL = 1e-6


@dataclass(frozen=True)
class RowMix:
    """``count`` new rows, row i = sum_j weights[i, j] * M[atoms[i, j]] for a matrix M.
    Slots of weight 0 are padding. A single row of atoms and weights (shape (1, k)) serves
    every new row, so a mean over a whole vocabulary is stored once."""

    atoms: np.ndarray  # (count or 1, k) int64 row ids of M
    weights: np.ndarray  # (count or 1, k) float64
    count: int

    def remapped(self, ids: np.ndarray) -> RowMix:
        """The same mix with each atom ``a`` replaced by ``ids[a]`` (dictionary index ->
        the row id in another matrix)."""
        return RowMix(ids[self.atoms] if self.atoms.size else self.atoms.copy(), self.weights,
                      self.count)


def zero_mix(count: int) -> RowMix:
    return RowMix(np.zeros((count, 0), np.int64), np.zeros((count, 0)), count)


def mean_mix(atoms: np.ndarray, count: int) -> RowMix:
    """Every new row is the mean of the rows ``atoms`` (zeros when there are none)."""
    if len(atoms) == 0:
        return zero_mix(count)
    return RowMix(np.asarray(atoms, np.int64)[None, :],
                  np.full((1, len(atoms)), 1.0 / len(atoms)), count)


def pieces_mix(pieces: Sequence[Sequence[int]]) -> RowMix:
    """Row i is the mean of the rows ``pieces[i]`` (each non-empty), padded to the
    longest."""
    width = max((len(p) for p in pieces), default=0)
    atoms = np.zeros((len(pieces), width), np.int64)
    weights = np.zeros((len(pieces), width))
    for i, p in enumerate(pieces):
        atoms[i, :len(p)] = p
        weights[i, :len(p)] = 1.0 / len(p)
    return RowMix(atoms, weights, len(pieces))


def apply_mix(mix: RowMix, matrix: np.ndarray, chunk_rows: int = 1024) -> np.ndarray:
    """The new rows (count, cols) as float32, summed in float64 from ``matrix`` (rows,
    cols), a float32 array."""
    cols = matrix.shape[1]
    if mix.atoms.shape[1] == 0:
        return np.zeros((mix.count, cols), np.float32)
    if mix.atoms.shape[0] == 1:
        row = mix.weights[0] @ matrix[mix.atoms[0]].astype(np.float64)
        return np.broadcast_to(row.astype(np.float32), (mix.count, cols)).copy()
    out = np.empty((mix.count, cols), np.float32)
    for start in range(0, mix.count, chunk_rows):
        end = min(start + chunk_rows, mix.count)
        # (chunk, k, cols) rows gathered per new row
        gathered = matrix[mix.atoms[start:end]].astype(np.float64)
        out[start:end] = np.einsum("mk,mkc->mc", mix.weights[start:end], gathered)
    return out


def omp(dictionary: np.ndarray, targets: np.ndarray, k: int,
        progress: object | None = None) -> RowMix:
    """Orthogonal matching pursuit: for each row t of ``targets`` (m, d), weights over at
    most ``k`` rows of ``dictionary`` (n, d) with t ~ sum w_i dictionary[a_i]. Greedy: add
    the row most correlated with the residual, refit all weights by least squares, until
    k rows or a residual of (relatively) zero. Atoms index ``dictionary``.

    ``progress``: a tqdm-like object, advanced by the targets done."""
    dictionary = np.asarray(dictionary, np.float32)
    n = dictionary.shape[0]
    m = targets.shape[0]
    k = min(k, n)
    atoms = np.zeros((m, k), np.int64)
    weights = np.zeros((m, k))
    if k == 0:
        return RowMix(atoms, weights, m)
    norms = np.linalg.norm(dictionary.astype(np.float64), axis=1)
    # zero rows correlate with nothing and are never picked
    inv_norms = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0)
    batch = max(1, min(MAX_BATCH_ROWS, CORRELATION_ELEMENTS // max(n, 1)))
    for start in range(0, m, batch):
        end = min(start + batch, m)
        atoms[start:end], weights[start:end] = _omp_batch(
            dictionary, inv_norms, np.asarray(targets[start:end], np.float64), k)
        if progress is not None:
            progress.update(end - start)  # type: ignore[attr-defined]
    return RowMix(atoms, weights, m)


def _omp_batch(dictionary: np.ndarray, inv_norms: np.ndarray, targets: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    b = targets.shape[0]
    rows = np.arange(b)
    atoms = np.zeros((b, k), np.int64)
    active = np.zeros((b, k), bool)  # slots holding a picked atom (the rest are padding)
    weights = np.zeros((b, k))
    gram = np.zeros((b, k, k))  # chosen atoms' inner products
    rhs = np.zeros((b, k))  # chosen atoms . target
    target_norms = np.linalg.norm(targets, axis=1)
    residual = targets.copy()
    done = target_norms == 0
    for j in range(k):
        if done.all():
            break
        corr = np.abs(residual.astype(np.float32) @ dictionary.T) * inv_norms  # (b, n)
        if j:
            np.put_along_axis(corr, atoms[:, :j], -1.0, axis=1)
        pick = corr.argmax(axis=1)
        # a residual orthogonal to every row left (e.g. duplicates of a chosen one): stop
        take = ~done & (corr[rows, pick] > RESIDUAL_TOL * target_norms * inv_norms[pick])
        atoms[:, j] = np.where(take, pick, 0)
        active[:, j] = take
        chosen = dictionary[atoms[:, :j + 1]].astype(np.float64)  # (b, j+1, d)
        column = np.einsum("bjd,bd->bj", chosen, chosen[:, j])
        gram[:, :j + 1, j] = column
        gram[:, j, :j + 1] = column
        rhs[:, j] = np.einsum("bd,bd->b", chosen[:, j], targets)
        w = _solve_masked(gram[:, :j + 1, :j + 1], rhs[:, :j + 1], active[:, :j + 1])
        weights[:, :j + 1] = w
        residual = targets - np.einsum("bj,bjd->bd", w, chosen)
        done |= np.linalg.norm(residual, axis=1) <= RESIDUAL_TOL * target_norms
    return atoms, weights


def _solve_masked(gram: np.ndarray, rhs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Least squares weights from the normal equations (b, j, j), padding slots (``mask``
    false) held at 0 by an identity row and a zero right-hand side."""
    pair = mask[:, :, None] & mask[:, None, :]
    system = np.where(pair, gram, 0.0)
    diag = np.arange(gram.shape[1])
    system[:, diag, diag] += ~mask
    right = np.where(mask, rhs, 0.0)
    try:
        return np.linalg.solve(system, right[..., None])[..., 0]
    except np.linalg.LinAlgError:  # nearly dependent atoms: the minimum-norm solution
        return (np.linalg.pinv(system) @ right[..., None])[..., 0]
