"""factorize: the truncated SVD's factors, checked against the singular values and
Eckart-Young's optimal error computed here in float64."""

from __future__ import annotations

import numpy as np
import pytest

from mergekit.lora.factor import factorize, uses_randomized


def with_spectrum(rows: int, cols: int, spectrum: np.ndarray, seed: int) -> np.ndarray:
    """A matrix with these singular values and random singular vectors."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((rows, len(spectrum))))
    v, _ = np.linalg.qr(rng.standard_normal((cols, len(spectrum))))
    return ((u * spectrum) @ v.T).astype(np.float32)


def optimal_error(x: np.ndarray, k: int) -> float:
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    return float(np.sqrt(np.sum(s[k:] ** 2)))


def error(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(x.astype(np.float64) - b.astype(np.float64) @ a))


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_truncated_product_is_the_best_rank_k_approximation(shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    a, b = factorize(x, 5)
    assert a.shape == (5, shape[1]) and b.shape == (shape[0], 5)
    assert a.dtype == b.dtype == np.float32
    u, s, vt = np.linalg.svd(x.astype(np.float64))
    best = (u[:, :5] * s[:5]) @ vt[:5]
    np.testing.assert_allclose(b.astype(np.float64) @ a, best, atol=1e-5)
    assert error(x, a, b) == pytest.approx(np.sqrt(np.sum(s[5:] ** 2)), rel=1e-5)


def test_exact_low_rank_is_recovered_at_its_rank():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((30, 3)) @ rng.standard_normal((3, 20))).astype(np.float32)
    a, b = factorize(x, 8, sv_epsilon=1e-4)
    assert a.shape[0] == 3  # the rest are float noise, at most ~1e-5
    np.testing.assert_allclose(b @ a, x, atol=1e-4)


def test_sv_epsilon_keeps_only_larger_singular_values():
    x = with_spectrum(20, 16, np.array([5.0, 3.0, 1.0, 0.5, 0.1]), seed=2)
    a, b = factorize(x, 16, sv_epsilon=0.75)
    assert a.shape == (3, 16) and b.shape == (20, 3)
    assert error(x, a, b) == pytest.approx(np.sqrt(0.5**2 + 0.1**2), rel=1e-4)


def test_zero_difference_has_rank_zero():
    a, b = factorize(np.zeros((6, 4), np.float32), 3)
    assert a.shape == (0, 4) and b.shape == (6, 0)
    assert (b @ a).shape == (6, 4)


def test_scale_distribution():
    x = with_spectrum(12, 10, np.array([4.0, 2.0, 1.0]), seed=3)
    a, b = factorize(x, 3, distribute_scale=False)
    np.testing.assert_allclose(a @ a.T, np.eye(3), atol=1e-5)  # A = Vt
    np.testing.assert_allclose(np.linalg.norm(b, axis=0), [4.0, 2.0, 1.0], rtol=1e-5)  # U S
    a, b = factorize(x, 3, distribute_scale=True)
    # sqrt(S) on both sides: A A^T = B^T B = S
    np.testing.assert_allclose(a @ a.T, np.diag([4.0, 2.0, 1.0]), atol=1e-5)
    np.testing.assert_allclose(b.T @ b, np.diag([4.0, 2.0, 1.0]), atol=1e-5)
    np.testing.assert_allclose(b @ a, x, atol=1e-5)


def test_rank_above_the_matrix_side_is_capped():
    x = np.random.default_rng(4).standard_normal((3, 7)).astype(np.float32)
    a, b = factorize(x, 64)
    assert a.shape == (3, 7)
    np.testing.assert_allclose(b @ a, x, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_rank"):
        factorize(np.ones((2, 2), np.float32), 0)
    with pytest.raises(ValueError, match="matrix"):
        factorize(np.ones(3, np.float32), 1)


SIDE = 1024
STEPS = np.arange(1, SIDE + 1)


@pytest.mark.slow  # 7 SVDs of 1500-row matrices
@pytest.mark.parametrize(("spectrum", "k"), [
    (1.0 / STEPS, 32),  # decaying as 1/i
    (np.exp(-STEPS / 100), 16),  # slow exponential decay: the tail close to the kept part
    (np.exp(-STEPS / 100), 64),
    (STEPS ** -0.5, 64),
    (np.ones(SIDE), 64),  # flat: every subspace is optimal
    (None, 32),  # a Gaussian matrix: a flat spectrum without gaps
    (None, 64),
])
def test_randomized_svd_stays_within_one_percent_of_the_exact_error(spectrum, k):
    rows = 1536
    assert uses_randomized(rows, SIDE, k)
    x = (np.random.default_rng(5).standard_normal((rows, SIDE)).astype(np.float32)
         if spectrum is None else with_spectrum(rows, SIDE, spectrum, seed=6))
    a, b = factorize(x, k, seed=7)
    assert a.shape == (k, SIDE)
    optimal = optimal_error(x, k)
    assert optimal <= error(x, a, b) <= 1.01 * optimal


def test_randomized_svd_only_for_large_matrices_and_small_ranks():
    assert not uses_randomized(512, 4096, 8)  # small side
    assert not uses_randomized(2048, 2048, 512)  # rank near the side
    assert uses_randomized(2048, 32000, 64)


def test_same_seed_same_bits():
    x = np.random.default_rng(8).standard_normal((1100, 1024)).astype(np.float32)
    first, second = factorize(x, 16, seed=3), factorize(x, 16, seed=3)
    assert all(np.array_equal(p, q) for p, q in zip(first, second))
