"""Class regions of a streamed prediction as polygons, merged across block and chunk borders.

The sliding window hands over its result block by block: column chunks left to right, and inside a
chunk, row bands top to bottom. Each block is cut into 4-connected regions per class (scipy's
``ndimage.label``) and traced into polygons with ``rasterio.features.shapes``, in *pixel* coordinates of
the whole raster: every vertex is an integer, so the pieces of one region cut by a block border share
their edges exactly and ``shapely.union_all`` dissolves them without slivers.

A piece may continue below its block (until the next band of the chunk arrives) or right of its chunk
(until the next chunk has reached its rows). Pieces are joined with a union-find where a region crosses
such a seam, and a region is handed out as soon as none of its pieces can still grow. Memory therefore
holds the regions that touch the open seams (one row and one column of the raster), not the raster.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

NO_PIECE = -1
"""Seam entry where no selected class is."""

FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]])
"""Pixels that share an edge are one region (diagonal neighbours are not), as in ``rasterio.features.shapes``."""


@dataclasses.dataclass
class Region:
    """A finished class region: one polygon of a class, with what its attributes are computed from."""

    class_index: int
    """Class of every pixel of the region."""
    geometry: object
    """shapely Polygon in raster pixel coordinates (x = column, y = row; pixel (r, c) is the square
    [c, c+1] × [r, r+1])."""
    pixels: int
    """Pixel count (the area before any simplification)."""
    confidence_sum: float
    """Sum of the per-pixel confidence over the region (mean = confidence_sum / pixels)."""


@dataclasses.dataclass
class _Group:
    """The pieces of one region found so far (held at the union-find root)."""

    class_index: int
    members: list[int]
    """Piece ids (forgotten with the group once it is handed out)."""
    geometries: list
    pixels: int
    confidence_sum: float
    open_seams: int = 0
    """Seams (below a band, right of a chunk) that pieces of this group touch and that are not processed yet."""


def _new_seam(height: int) -> tuple[np.ndarray, np.ndarray]:
    """Piece ids (NO_PIECE) and labels along one column of the raster."""
    return np.full(height, NO_PIECE, np.int64), np.zeros(height, np.uint8)


class Polygonizer:
    """Consumes the blocks of one raster's prediction and yields each class region once it is complete."""

    def __init__(self, height: int, width: int, class_indices: Sequence[int]) -> None:
        self.height, self.width = height, width
        self.selected = np.zeros(256, dtype=bool)
        self.selected[list(class_indices)] = True
        self.next_id = 0
        self.parent: dict[int, int] = {}
        self.groups: dict[int, _Group] = {}
        self.chunk_x: int | None = None
        self.band_seam: tuple[np.ndarray, np.ndarray] | None = None
        """Piece ids and labels of the last row of the chunk's latest band (waiting for the band below)."""
        self.below: list[int] = []
        """Pieces on that row: their seam closes when the next band of the chunk arrives."""
        self.left_seam = _new_seam(height)
        """Piece ids and labels of the previous chunk's last column."""
        self.right_seam = _new_seam(height)
        """Piece ids and labels of the current chunk's last column (the next chunk's left seam)."""
        self.left_open: dict[int, int] = {}
        """Previous-chunk pieces on its last column -> their lowest row there: their seam closes once this
        chunk has passed that row."""
        self.right_open: dict[int, int] = {}
        """The same for the current chunk's pieces on its last column."""

    def _find(self, piece: int) -> int:
        root = piece
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[piece] != root:
            self.parent[piece], piece = root, self.parent[piece]
        return root

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra == rb:
            return
        ga, gb = self.groups.pop(ra), self.groups[rb]
        gb.members += ga.members
        gb.geometries += ga.geometries
        gb.pixels += ga.pixels
        gb.confidence_sum += ga.confidence_sum
        gb.open_seams += ga.open_seams
        self.parent[ra] = rb

    def add(self, y: int, x: int, labels: np.ndarray, confidence: np.ndarray) -> Iterator[Region]:
        """Take the block at row ``y``, column ``x``; yield the regions that it completes."""
        h, w = labels.shape
        if x != self.chunk_x:
            self._next_chunk(x)
        first = self.next_id
        ids = self._pieces(labels, confidence, y, x)
        if y + h < self.height:
            below = [int(p) for p in np.unique(ids[-1]) if p != NO_PIECE]
            for piece in below:
                self.groups[self._find(piece)].open_seams += 1
        else:
            below = []
        if x + w < self.width:
            column = ids[:, -1]
            self.right_seam[0][y:y + h], self.right_seam[1][y:y + h] = column, labels[:, -1]
            for row in np.flatnonzero(column != NO_PIECE):
                piece = int(column[row])
                if piece not in self.right_open:
                    self.groups[self._find(piece)].open_seams += 1
                self.right_open[piece] = y + int(row)
        self._join(ids[0], labels[0], self.band_seam)
        self._join(ids[:, 0], labels[:, 0], (self.left_seam[0][y:y + h], self.left_seam[1][y:y + h]))
        closed = self._close(self.below) + self._close([p for p, last in self.left_open.items() if last < y + h])
        for piece in closed:
            self.left_open.pop(piece, None)
        self.band_seam = (ids[-1].copy(), labels[-1].copy()) if below else None
        self.below = below
        yield from self._finished(list(range(first, self.next_id)) + closed)

    def _pieces(self, labels: np.ndarray, confidence: np.ndarray, y: int, x: int) -> np.ndarray:
        """Trace the regions of the selected classes in one block into new pieces (each its own group);
        returns the block's piece id per pixel (NO_PIECE elsewhere)."""
        from affine import Affine
        from rasterio.features import shapes
        from scipy import ndimage
        from shapely.geometry import shape

        ids = np.full(labels.shape, NO_PIECE, dtype=np.int64)
        for cls in np.unique(labels):
            if not self.selected[cls]:
                continue
            components, count = ndimage.label(labels == cls, structure=FOUR_CONNECTED)
            base = self.next_id - 1
            inside = components > 0
            ids[inside] = components[inside] + base
            flat = components.ravel()
            pixels = np.bincount(flat, minlength=count + 1)
            sums = np.bincount(flat, weights=confidence.ravel().astype(np.float64), minlength=count + 1)
            for geom, value in shapes(components.astype(np.int32), mask=inside, connectivity=4,
                                      transform=Affine.translation(x, y)):
                k = int(value)
                self.parent[base + k] = base + k
                self.groups[base + k] = _Group(int(cls), [base + k], [shape(geom)], int(pixels[k]), float(sums[k]))
            self.next_id += count
        return ids

    def _join(self, ids: np.ndarray, labels: np.ndarray, seam: tuple[np.ndarray, np.ndarray] | None) -> None:
        """Union the new pieces along one edge of the block with the old pieces across that seam."""
        if seam is None:
            return
        old_ids, old_labels = seam
        same = (ids != NO_PIECE) & (old_ids != NO_PIECE) & (labels == old_labels)
        for new, old in set(zip(ids[same].tolist(), old_ids[same].tolist())):
            self._union(new, old)

    def _close(self, pieces: list[int]) -> list[int]:
        """These pieces' seams have been processed: their groups have one open seam less each."""
        for piece in pieces:
            self.groups[self._find(piece)].open_seams -= 1
        return pieces

    def _next_chunk(self, x: int) -> None:
        """A new column chunk starts: the last one's right column becomes the left seam."""
        self.band_seam, self.below = None, []
        self.left_seam, self.right_seam = self.right_seam, _new_seam(self.height)
        self.left_open, self.right_open = self.right_open, {}
        self.chunk_x = x

    def _finished(self, pieces: list[int]) -> Iterator[Region]:
        """Hand out (and forget) the groups of ``pieces`` that have no open seam left."""
        import shapely

        for root in {self._find(p) for p in pieces}:
            group = self.groups.get(root)
            if group is None or group.open_seams > 0:
                continue
            del self.groups[root]
            for member in group.members:
                del self.parent[member]
            geometry = group.geometries[0] if len(group.geometries) == 1 else shapely.union_all(group.geometries)
            if not geometry.is_valid:
                geometry = shapely.make_valid(geometry)
            yield Region(group.class_index, geometry, group.pixels, group.confidence_sum)

    def finish(self) -> Iterator[Region]:
        """Every block has been added: hand out whatever is left (nothing, when the blocks covered the raster)."""
        for group in self.groups.values():
            group.open_seams = 0
        yield from self._finished(list(self.groups))
