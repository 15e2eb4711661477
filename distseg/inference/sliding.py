"""Streaming sliding-window inference with blended overlaps, split across ranks.

The raster is processed in column chunks; inside a chunk, window rows run top to bottom and a
band accumulator of (classes + 1) × window-height × chunk-width floats holds the weighted
probability sums and the weight sums. Once the next window row starts below some rows, no later
window can touch them: they are divided by their weight sum, reduced across ranks, turned into
labels and confidences, and handed to the writers as a :class:`Block`. Memory therefore depends
on the tile and chunk sizes only, never on the raster size.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import numpy as np
import torch

from distseg.inference.config import PredictConfig
from distseg.inference.errors import PredictError
from distseg.inference.raster import Reader
from distseg.inference.windows import (blend_weights, column_chunks, shard, window_size, window_starts,
                                       windows_in_range)


@dataclasses.dataclass(frozen=True)
class Block:
    """A finished rectangle of the output (rank 0 only)."""

    y: int
    """Top row in the raster."""
    x: int
    """Left column in the raster."""
    labels: np.ndarray
    """uint8 h × w class indices, ``ignore_index`` where the input is nodata."""
    confidence: np.ndarray
    """float32 h × w blended probability of the predicted class, 0 on nodata."""
    valid: np.ndarray
    """bool h × w, False on input nodata."""


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """Where the windows of one raster go."""

    height: int
    width: int
    win_h: int
    win_w: int
    ys: list[int]
    xs: list[int]
    chunks: list[tuple[int, int]]
    weight: torch.Tensor
    """win_h × win_w blending weight."""

    @classmethod
    def build(cls, height: int, width: int, cfg: PredictConfig) -> WindowPlan:
        """Window size, positions, chunks and weight for a ``height × width`` raster."""
        win_h = window_size(height, cfg.tile, cfg.size_multiple)
        win_w = window_size(width, cfg.tile, cfg.size_multiple)
        ov_h, ov_w = round(win_h * cfg.overlap), round(win_w * cfg.overlap)
        return cls(height, width, win_h, win_w, window_starts(height, win_h, ov_h),
                   window_starts(width, win_w, ov_w), column_chunks(width, cfg.chunk_width),
                   blend_weights(win_h, win_w, ov_h, ov_w))

    def chunk_columns(self, chunk: tuple[int, int]) -> list[int]:
        """Window column starts that touch ``chunk``."""
        return windows_in_range(self.xs, self.win_w, *chunk)

    def num_windows(self, rank: int = 0, world_size: int = 1) -> int:
        """Windows this rank computes (for the progress bar), counting chunk-boundary repeats."""
        per_row = sum(len(shard(self.chunk_columns(c), rank, world_size)) for c in self.chunks)
        return per_row * len(self.ys)


def mirror_pad(pixels: np.ndarray, h: int, w: int) -> np.ndarray:
    """A window's pixels cut short by the raster edge, mirrored out to ``h`` × ``w`` (the model's input size)."""
    hh, ww = pixels.shape[:2]
    if (hh, ww) == (h, w):
        return pixels
    return np.pad(pixels, ((0, h - hh), (0, w - ww), (0, 0)), mode="symmetric")


def read_padded(reader: Reader, y: int, x: int, h: int, w: int) -> tuple[np.ndarray, bool]:
    """Window pixels (mirrored past the raster edge) and whether any of them is valid."""
    hh, ww = min(h, reader.height - y), min(w, reader.width - x)
    return mirror_pad(reader.read(y, x, hh, ww), h, w), bool(reader.read_valid(y, x, hh, ww).any())


class SlidingWindow:
    """Runs ``model`` over a reader window by window and yields finished output blocks."""

    def __init__(self, model: torch.nn.Module, num_classes: int, cfg: PredictConfig, device: torch.device,
                 rank: int = 0, world_size: int = 1) -> None:
        self.model = model
        self.num_classes = num_classes
        self.cfg = cfg
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self._flips: list[tuple[int, ...]] = [()] + ([(3,), (2,), (2, 3)] if cfg.tta else [])

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Reduced-precision forward when asked; float32 needs no context."""
        if self.cfg.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.cfg.dtype))

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (float32, B×C×H×W) averaged over the test-time flips."""
        total = torch.zeros(())
        for dims in self._flips:
            with self._autocast():
                logits = self.model(batch.flip(dims) if dims else batch)
            if logits.ndim != 4 or logits.shape[1] != self.num_classes or logits.shape[2:] != batch.shape[2:]:
                raise PredictError(f"model returned logits of shape {tuple(logits.shape)} for input "
                                   f"{tuple(batch.shape)}; expected {self.num_classes} classes at the input size "
                                   f"(do the weights and the class map disagree?)")
            probs = logits.float().softmax(dim=1)
            total = total + (probs.flip(dims) if dims else probs)
        return total / len(self._flips)

    def run(self, reader: Reader, ignore_index: int,
            on_windows: Callable[[int], None] | None = None) -> Iterator[Block]:
        """Yield the finished blocks of ``reader``'s prediction, chunk by chunk, top to bottom."""
        plan = WindowPlan.build(reader.height, reader.width, self.cfg)
        weight = plan.weight.to(self.device)
        with torch.inference_mode():
            for chunk in plan.chunks:
                acc = torch.zeros(self.num_classes + 1, plan.win_h, chunk[1] - chunk[0], device=self.device)
                top = 0
                for y in plan.ys:
                    if y > top:
                        yield from self._finish(acc, reader, top, y, chunk[0], ignore_index)
                        _shift_up(acc, y - top)
                        top = y
                    self._accumulate(acc, reader, plan, y, chunk, weight, on_windows)
                yield from self._finish(acc, reader, top, min(top + plan.win_h, plan.height), chunk[0], ignore_index)

    def _accumulate(self, acc: torch.Tensor, reader: Reader, plan: WindowPlan, y: int, chunk: tuple[int, int],
                    weight: torch.Tensor, on_windows: Callable[[int], None] | None) -> None:
        """Add this rank's windows of row ``y`` (weighted probabilities and weights) into ``acc``."""
        mine = shard(plan.chunk_columns(chunk), self.rank, self.world_size)
        for start in range(0, len(mine), self.cfg.batch_size):
            xs, pixels = [], []
            for x in mine[start:start + self.cfg.batch_size]:
                window, any_valid = read_padded(reader, y, x, plan.win_h, plan.win_w)
                if any_valid:  # all-nodata windows cannot change any valid pixel: skip the forward
                    xs.append(x)
                    pixels.append(window)
            if xs:
                batch = torch.from_numpy(np.stack(pixels)).to(self.device).permute(0, 3, 1, 2)
                probs = self.probabilities(batch.float().div_(reader.scale))
                for prob, x in zip(probs, xs):
                    lo, hi = max(x, chunk[0]), min(x + plan.win_w, chunk[1])
                    w = weight[:, lo - x:hi - x]
                    acc[:-1, :, lo - chunk[0]:hi - chunk[0]] += prob[:, :, lo - x:hi - x] * w
                    acc[-1, :, lo - chunk[0]:hi - chunk[0]] += w
            if on_windows is not None:
                on_windows(len(mine[start:start + self.cfg.batch_size]))

    def _finish(self, acc: torch.Tensor, reader: Reader, y0: int, y1: int, x0: int,
                ignore_index: int) -> Iterator[Block]:
        """Reduce rows ``y0..y1`` of the band over ranks and, on rank 0, yield them as a block."""
        sums = acc[:, : y1 - y0].contiguous()
        if self.world_size > 1:
            torch.distributed.reduce(sums, dst=0)
        if self.rank != 0:
            return
        weight = sums[-1]
        confidence, labels = (sums[:-1] / weight.clamp_min(1e-12)).max(dim=0)
        valid = reader.read_valid(y0, x0, y1 - y0, sums.shape[2]) & (weight > 0).cpu().numpy()
        labels_np = labels.to(torch.uint8).cpu().numpy()
        confidence_np = confidence.cpu().numpy()
        labels_np[~valid] = ignore_index
        confidence_np[~valid] = 0.0
        yield Block(y0, x0, labels_np, confidence_np, valid)


def _shift_up(acc: torch.Tensor, rows: int) -> None:
    """Drop the first ``rows`` (finished) rows of the band and zero the rows that come free at the bottom."""
    keep = acc.shape[1] - rows
    if keep > 0:
        acc[:, :keep] = acc[:, rows:].clone()
    acc[:, max(keep, 0):] = 0
