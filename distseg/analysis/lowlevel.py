"""Low-level image statistics of one tile: per-channel colour histograms and a gradient-magnitude (texture) histogram.

Both are counts, so tiles add up into a dataset histogram without holding any pixels. They see what a fixed
ImageNet encoder may discount: the palette and the fine texture of a sensor and a place.
"""
from __future__ import annotations

import numpy as np

TEXTURE_BINS = 64
"""Bins of the gradient-magnitude histogram, uniform in sqrt(magnitude) so fine texture gets most of them."""


def color_histogram(image: np.ndarray) -> np.ndarray:
    """3×256 counts: the histogram of each RGB channel of a uint8 H×W×3 tile (exact, one bin per value)."""
    flat = image.reshape(-1, 3)
    return np.stack([np.bincount(flat[:, c], minlength=256) for c in range(3)])


def texture_histogram(image: np.ndarray) -> np.ndarray:
    """Counts of forward-difference gradient magnitudes of the tile's luminance (in [0, 1] units).

    A tile narrower than 2 pixels has no gradient and contributes nothing.
    """
    gray = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32) / 255.0
    if min(gray.shape) < 2:
        return np.zeros(TEXTURE_BINS, dtype=np.int64)
    gx = gray[:-1, 1:] - gray[:-1, :-1]
    gy = gray[1:, :-1] - gray[:-1, :-1]
    level = np.sqrt(np.minimum(np.hypot(gx, gy), 1.0))
    index = np.minimum((level * TEXTURE_BINS).astype(np.int64), TEXTURE_BINS - 1)
    return np.bincount(index.ravel(), minlength=TEXTURE_BINS)
