"""Distances between two datasets' statistics: Fréchet distance, kernel MMD with a permutation test, histogram
earth mover's distances and tile-size mismatch. Pure functions of arrays, each testable against a naive reference.
"""
from __future__ import annotations

import dataclasses

import numpy as np


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix (negative round-off eigenvalues clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein) distance between Gaussians: |mu1-mu2|² + tr(C1 + C2 - 2 (C1^½ C2 C1^½)^½).

    The cross term goes through the symmetric matrix C1^½ C2 C1^½, whose eigenvalues are real and non-negative,
    instead of the non-symmetric product C1 C2 that FID code often feeds to a general matrix square root.
    """
    root = _sqrt_psd(cov1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ cov2 @ root), 0, None)).sum()
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * cross)
    return max(value, 0.0)


def median_bandwidth(x: np.ndarray, max_points: int = 1000) -> float:
    """The median pairwise Euclidean distance among (at most ``max_points`` of) the rows of ``x``."""
    x = x[:max_points].astype(np.float64)
    sq = (x ** 2).sum(1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0, None)
    upper = d2[np.triu_indices(len(x), k=1)]
    return float(np.sqrt(np.median(upper))) if upper.size else 1.0


def rbf_kernel(z: np.ndarray, bandwidth: float) -> np.ndarray:
    """exp(-|a-b|² / (2 h²)) over all row pairs of ``z``."""
    z = z.astype(np.float64)
    sq = (z ** 2).sum(1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0, None)
    return np.exp(-d2 / (2 * max(bandwidth, 1e-12) ** 2))


def _mmd2_columns(kernel: np.ndarray, member: np.ndarray) -> np.ndarray:
    """Unbiased MMD² for each column of ``member`` (N×P bool: True = first sample), from the joint kernel.

    With indicator vectors a (first sample) and b (second), sum_XX = aᵀKa etc.; the diagonal (the self-pairs the
    unbiased estimator leaves out) is subtracted.
    """
    a = member.astype(np.float64)
    b = 1.0 - a
    ka, kb = kernel @ a, kernel @ b
    diag = np.diag(kernel)
    n, m = a.sum(0), b.sum(0)
    xx = ((a * ka).sum(0) - diag @ a) / (n * (n - 1))
    yy = ((b * kb).sum(0) - diag @ b) / (m * (m - 1))
    xy = (a * kb).sum(0) / (n * m)
    return xx + yy - 2 * xy


@dataclasses.dataclass(frozen=True)
class MMDResult:
    """Unbiased MMD² between two samples and the permutation p-value of 'same distribution'."""

    mmd2: float
    p_value: float
    bandwidth: float
    permutations: int


def mmd_test(x: np.ndarray, y: np.ndarray, bandwidth: float, permutations: int = 200, seed: int = 0,
             chunk: int = 50) -> MMDResult:
    """Kernel two-sample test (Gretton et al., 2012) with an RBF kernel of fixed ``bandwidth``.

    The p-value is (1 + #{permuted MMD² >= observed}) / (1 + permutations), which is valid (never below the level
    under the null) for any number of permutations. Permutations run ``chunk`` at a time as matrix products.
    """
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"the MMD test needs at least 2 tiles per sample, got {len(x)} and {len(y)}")
    kernel = rbf_kernel(np.concatenate([x, y]), bandwidth)
    n, total = len(x), len(x) + len(y)
    observed = float(_mmd2_columns(kernel, (np.arange(total) < n)[:, None])[0])
    rng = np.random.default_rng(seed)
    exceed, done = 0, 0
    while done < permutations:
        k = min(chunk, permutations - done)
        member = np.zeros((total, k), dtype=bool)
        for j in range(k):
            member[rng.permutation(total)[:n], j] = True
        exceed += int((_mmd2_columns(kernel, member) >= observed).sum())
        done += k
    return MMDResult(observed, (1 + exceed) / (1 + permutations), bandwidth, permutations)


def wasserstein_1d(p: np.ndarray, q: np.ndarray) -> float:
    """Earth mover's distance between two histograms of counts on the same bins, in units of the whole range.

    Unlike a bin-wise divergence it grows with *how far* mass moved, so a slight colour cast stays a small
    distance instead of saturating once the mass leaves its bins. 0 for equal histograms, 1 at most.
    """
    p = p.astype(np.float64) / max(p.sum(), 1)
    q = q.astype(np.float64) / max(q.sum(), 1)
    return float(np.abs(np.cumsum(p - q)).sum() / len(p))


def color_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Mean over the RGB channels of the 1-D earth mover's distance of two 3×256 colour histograms."""
    return float(np.mean([wasserstein_1d(a, b) for a, b in zip(p, q)]))


def size_gap(sizes_a: np.ndarray, sizes_b: np.ndarray) -> float:
    """|log2| of the ratio of the median tile sides (sqrt of area): 0 for equal sizes, 1 for a factor of 2."""
    side_a = np.sqrt(np.median(sizes_a[:, 0] * sizes_a[:, 1]))
    side_b = np.sqrt(np.median(sizes_b[:, 0] * sizes_b[:, 1]))
    return float(abs(np.log2(side_a / side_b)))
