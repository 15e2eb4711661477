"""Cutting large images into fixed-size tiles with padded edges."""
from __future__ import annotations

import math

import numpy as np


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile start offsets along one axis: stride ``tile - overlap`` until the image is covered.

    The last tile may run past the edge; it is padded (rather than shifted back) so every tile has
    the same stride and no pixel is duplicated more than the overlap asks for.
    """
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - overlap) / stride)
    return [i * stride for i in range(count)]


def tile_grid(width: int, height: int, tile: int | None, overlap: int) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) crops covering an image; without ``tile`` the whole image is one crop."""
    if tile is None:
        return [(0, 0, width, height)]
    return [(x, y, tile, tile) for y in tile_starts(height, tile, overlap) for x in tile_starts(width, tile, overlap)]


def crop_padded(array: np.ndarray, x: int, y: int, w: int, h: int, fill: int) -> np.ndarray:
    """Crop ``array`` (H×W or H×W×C) to (x, y, w, h), padding what falls outside with ``fill``."""
    out = np.full((h, w) + array.shape[2:], fill, dtype=array.dtype)
    part = array[y:y + h, x:x + w]
    out[: part.shape[0], : part.shape[1]] = part
    return out


def is_whole(width: int, height: int, crop: tuple[int, int, int, int]) -> bool:
    """Whether a crop is exactly the full image (so the original encoded bytes can be kept)."""
    return crop == (0, 0, width, height)
