"""LogME (You et al., 2021): how well features explain labels, as the maximum evidence of a linear model.

For each class c the one-hot target y_c is modelled as y = F w + noise with w ~ N(0, α⁻¹ I) and noise
~ N(0, β⁻¹ I); LogME is the log marginal likelihood log p(y | F, α, β), maximised over α and β by MacKay's
fixed-point updates, divided by the number of samples and averaged over classes. No training and no
hyper-parameters: a higher value means the labels are more linearly predictable from the features.
"""
from __future__ import annotations

import math

import numpy as np


def evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log p(y | F, α, β) in closed form from the SVD (the quantity LogME maximises), for one target column."""
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    return _evidence(s ** 2, u.T @ y, float(y @ y), n, d, alpha, beta)


def _posterior(sigma: np.ndarray, z: np.ndarray, alpha: float, beta: float) -> tuple[np.ndarray, float]:
    """Posterior mean of w in the right-singular basis, and the effective number of parameters γ."""
    m = beta * np.sqrt(sigma) * z / (alpha + beta * sigma)
    gamma = float((beta * sigma / (alpha + beta * sigma)).sum())
    return m, gamma


def _evidence(sigma: np.ndarray, z: np.ndarray, yy: float, n: int, d: int, alpha: float, beta: float) -> float:
    """The evidence from the singular values² ``sigma`` and the projections ``z = Uᵀy``."""
    m, _ = _posterior(sigma, z, alpha, beta)
    residual = float(((np.sqrt(sigma) * m - z) ** 2).sum() + max(yy - float(z @ z), 0.0))
    log_det = float(np.log(alpha + beta * sigma).sum()) + (d - len(sigma)) * math.log(alpha)
    return (n * math.log(beta) + d * math.log(alpha) - n * math.log(2 * math.pi) - beta * residual
            - alpha * float(m @ m) - log_det) / 2


def _maximise(sigma: np.ndarray, z: np.ndarray, yy: float, n: int, iters: int = 100,
              tol: float = 1e-6) -> tuple[float, float]:
    """MacKay's fixed point: α = γ / |m|², β = (n − γ) / |Fm − y|², from α = β = 1."""
    alpha = beta = 1.0
    for _ in range(iters):
        m, gamma = _posterior(sigma, z, alpha, beta)
        residual = float(((np.sqrt(sigma) * m - z) ** 2).sum() + max(yy - float(z @ z), 0.0))
        new_alpha = gamma / max(float(m @ m), 1e-12)
        new_beta = max(n - gamma, 1e-12) / max(residual, 1e-12)
        done = abs(new_alpha - alpha) <= tol * alpha and abs(new_beta - beta) <= tol * beta
        alpha, beta = new_alpha, new_beta
        if done:
            break
    return alpha, beta


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present in ``labels`` of the maximised evidence per sample (higher = better)."""
    f = features.astype(np.float64)
    n, d = f.shape
    if n < 2:
        raise ValueError(f"LogME needs at least 2 samples, got {n}")
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s ** 2
    scores = []
    for c in np.unique(labels):
        y = (labels == c).astype(np.float64)
        z = u.T @ y
        alpha, beta = _maximise(sigma, z, float(y @ y), n)
        scores.append(_evidence(sigma, z, float(y @ y), n, d, alpha, beta) / n)
    return float(np.mean(scores))
