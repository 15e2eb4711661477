"""Window geometry for sliding-window inference: where windows go, how they blend, who computes them.

All functions are pure (numpy/torch only, no I/O) so the tiling can be tested exactly against naive
references. Positions are pixel offsets of a window's top-left corner; windows never start outside
the image, but a window may extend past the bottom/right edge when the image is smaller than a tile
(the reader pads it and the extra rows/columns are discarded).
"""
from __future__ import annotations

import math
from typing import Sequence, TypeVar

import torch

T = TypeVar("T")


def window_size(length: int, tile: int, multiple: int) -> int:
    """Window extent along one axis: the tile, or less for a small image, rounded up to ``multiple``.

    Small images then cost one small forward pass instead of a full tile of padding, while the
    extent stays a multiple of the backbone stride so that feature maps align.
    """
    if length < 1 or tile < 1 or multiple < 1:
        raise ValueError(f"length, tile and multiple must be positive, got {length}, {tile}, {multiple}")
    return min(tile, math.ceil(length / multiple) * multiple)


def window_starts(length: int, size: int, overlap: int) -> list[int]:
    """Start offsets covering ``[0, length)`` with windows of ``size`` overlapping by at least ``overlap``.

    Windows advance by ``size - overlap``; the last one is moved back to end exactly at ``length``
    (so no window sticks out of a large image, and the last overlap can only grow).
    """
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, {size}), got {overlap}")
    if length <= size:
        return [0]
    stride = size - overlap
    starts = list(range(0, length - size, stride))
    starts.append(length - size)
    return starts


def blend_profile(size: int, ramp: int) -> torch.Tensor:
    """1-D blending weight: 1 in the middle, falling linearly over ``ramp`` pixels toward both ends.

    With ``ramp`` equal to the overlap, neighbouring windows cross-fade: a pixel near a window's edge,
    where the receptive field is cut off and predictions are worst, counts less than the same pixel
    seen from the middle of the next window. Weights stay strictly positive so that pixels at the
    image border (seen only by edge windows) still have a defined average.
    """
    if ramp <= 0:
        return torch.ones(size)
    idx = torch.arange(size, dtype=torch.float32)
    dist = torch.minimum(idx, size - 1 - idx)
    return ((dist + 0.5) / ramp).clamp(max=1.0)


def blend_weights(height: int, width: int, ramp_h: int, ramp_w: int) -> torch.Tensor:
    """2-D window weight (height × width): the outer product of the two 1-D profiles."""
    return blend_profile(height, ramp_h)[:, None] * blend_profile(width, ramp_w)[None, :]


def column_chunks(width: int, chunk: int) -> list[tuple[int, int]]:
    """Split ``[0, width)`` into column ranges of at most ``chunk`` pixels.

    Accumulators are kept for one chunk at a time, so memory does not grow with the raster width;
    windows that straddle a boundary are computed once for each side.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    return [(x0, min(x0 + chunk, width)) for x0 in range(0, width, chunk)]


def windows_in_range(starts: Sequence[int], size: int, lo: int, hi: int) -> list[int]:
    """The starts whose window ``[s, s + size)`` intersects ``[lo, hi)``."""
    return [s for s in starts if s < hi and s + size > lo]


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th one, starting at ``rank``.

    Strided rather than contiguous so that ranks get equal work even when windows late in a row
    are all nodata (skipped); the shares of all ranks partition ``items`` exactly.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return list(items[rank::world_size])
