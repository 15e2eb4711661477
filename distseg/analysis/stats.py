"""One streaming pass over a dataset's sampled tiles: everything the measures need, and nothing else.

Per depth the encoder's pooled features go into running moments (count, sum, sum of outer products, in float64),
which is all the Fréchet distance needs. The kernel MMD test and the 2-D embedding need per-tile vectors, so each
tile also keeps one unit-norm embedding (its depths' pooled features, each L2-normalised, concatenated): a few
hundred floats per tile. Colour and texture histograms are summed counts, and the valid tile sizes are kept.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from distseg.analysis.encoder import Encoder
from distseg.analysis.lowlevel import TEXTURE_BINS, color_histogram, texture_histogram
from distseg.analysis.sources import Dataset, read_tiles


@dataclasses.dataclass
class Moments:
    """Running first and second moments of a stream of D-dimensional vectors."""

    n: int
    total: np.ndarray
    outer: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> Moments:
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    def add(self, x: np.ndarray) -> None:
        """Fold in a B×D batch."""
        x = x.astype(np.float64)
        self.n += len(x)
        self.total += x.sum(0)
        self.outer += x.T @ x

    def mean(self) -> np.ndarray:
        return self.total / max(self.n, 1)

    def cov(self) -> np.ndarray:
        """The unbiased covariance (zeros for fewer than two vectors)."""
        if self.n < 2:
            return np.zeros_like(self.outer)
        mu = self.mean()
        return (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)


@dataclasses.dataclass
class DatasetStats:
    """What one pass over a dataset's sample leaves behind."""

    name: str
    sampled: int
    """Tiles read."""
    small: int
    """Tiles whose valid region is smaller than the encoder input (histograms only, no features)."""
    moments: list[Moments]
    """Per depth, the pooled features' moments."""
    embeddings: np.ndarray
    """encoded × E unit-norm per-tile vectors (MMD, the 2-D picture)."""
    color: np.ndarray
    texture: np.ndarray
    sizes: np.ndarray
    """sampled × 2 valid (height, width) of the tiles."""
    seconds: float
    cpu_seconds: float

    @property
    def encoded(self) -> int:
        return len(self.embeddings)


def centre_crop(image: np.ndarray, size: int) -> np.ndarray | None:
    """The central size×size window of a tile, or None when the tile is smaller."""
    h, w = image.shape[:2]
    if h < size or w < size:
        return None
    y, x = (h - size) // 2, (w - size) // 2
    return image[y:y + size, x:x + size]


def embed(pooled: list[torch.Tensor]) -> np.ndarray:
    """Per-tile unit vectors: each depth L2-normalised (so every depth weighs the same), concatenated."""
    parts = [torch.nn.functional.normalize(p, dim=1) for p in pooled]
    return (torch.cat(parts, dim=1) / len(parts) ** 0.5).cpu().numpy()


class _Accumulator:
    """The running state of one pass (kept apart from the loop so the loop stays short)."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder
        self.moments = [Moments.empty(c) for c in encoder.channels]
        self.embeddings: list[np.ndarray] = []
        self.color = np.zeros((3, 256), dtype=np.int64)
        self.texture = np.zeros(TEXTURE_BINS, dtype=np.int64)
        self.sizes: list[tuple[int, int]] = []
        self.batch: list[np.ndarray] = []

    def add_tile(self, image: np.ndarray, crop: np.ndarray | None) -> None:
        self.color += color_histogram(image)
        self.texture += texture_histogram(image)
        self.sizes.append(image.shape[:2])
        if crop is not None:
            self.batch.append(crop)

    def flush(self) -> None:
        """Encode the pending crops."""
        if not self.batch:
            return
        device = self.encoder.mean.device
        images = torch.from_numpy(np.stack(self.batch)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
        pooled = self.encoder.pooled(images)
        for m, p in zip(self.moments, pooled):
            m.add(p.cpu().numpy())
        self.embeddings.append(embed(pooled))
        self.batch = []


def collect(ds: Dataset, encoder: Encoder, size: int, batch_size: int, progress=None) -> DatasetStats:
    """Stream ``ds``'s sample once; ``progress`` is an optional callable advanced by one per tile."""
    start, cpu = time.perf_counter(), time.process_time()
    acc = _Accumulator(encoder)
    small = 0
    for tile in read_tiles(ds):
        crop = centre_crop(tile.image, size)
        small += crop is None
        acc.add_tile(tile.image, crop)
        if len(acc.batch) == batch_size:
            acc.flush()
        if progress is not None:
            progress()
    acc.flush()
    dim = sum(encoder.channels)
    embeddings = np.concatenate(acc.embeddings) if acc.embeddings else np.zeros((0, dim), dtype=np.float32)
    return DatasetStats(ds.name, len(acc.sizes), small, acc.moments, embeddings, acc.color, acc.texture,
                        np.array(acc.sizes, dtype=np.int64).reshape(-1, 2), time.perf_counter() - start,
                        time.process_time() - cpu)
