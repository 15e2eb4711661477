"""Output writers: index mask, colour map, overlay and confidence, as PNGs or windowed GeoTIFFs.

Every output is written under a temporary name beside its final path and renamed only when the
whole raster is done, so an interrupted run never leaves a truncated file with a valid name.
PNG outputs (for PNG/JPEG inputs) are assembled in memory like their inputs; GeoTIFF outputs are
written block by block in whole 256-row strips so each compressed TIFF tile is written once.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np

from distseg.inference.config import PredictConfig
from distseg.inference.errors import PredictError
from distseg.inference.raster import RASTER_SUFFIXES, Reader
from distseg.inference.sliding import Block

TIFF_BLOCK = 256
KINDS = ("mask", "color", "overlay", "confidence")


def output_paths(out_dir: Path, input_path: Path, cfg: PredictConfig) -> dict[str, Path]:
    """Final paths of the outputs ``cfg`` asks for, the class raster's QGIS style and the JSON summary, by kind."""
    suffix = ".tif" if input_path.suffix.lower() in RASTER_SUFFIXES or cfg.georef_from_name else ".png"
    wanted = {"mask": True, "color": cfg.color, "overlay": cfg.overlay, "confidence": cfg.confidence}
    paths = {k: out_dir / f"{input_path.stem}_{k}{suffix}" for k in KINDS if wanted[k]}
    paths["style"] = out_dir / f"{input_path.stem}_mask.qml"
    paths["summary"] = out_dir / f"{input_path.stem}_summary.json"
    return paths


def check_outputs(paths: dict[str, Path], force: bool) -> None:
    """Refuse to overwrite an existing output unless ``force``."""
    if force:
        return
    for path in paths.values():
        if path.exists():
            raise PredictError(f"{path}: output exists; pass --force to overwrite")


def partial_path(path: Path) -> Path:
    """The temporary name an output is written under until it is complete."""
    return path.with_name(f".{path.name}.partial")


def _to_uint8(pixels: np.ndarray, scale: float) -> np.ndarray:
    """Input pixels -> displayable uint8 RGB."""
    if pixels.dtype == np.uint8 and scale == 255.0:
        return pixels
    return np.clip(pixels.astype(np.float32) * (255.0 / scale), 0, 255).round().astype(np.uint8)


class Renderer:
    """Turns a finished block into the pixel arrays (h × w × bands, uint8) of each output kind."""

    def __init__(self, colors: list[tuple[int, int, int]], reader: Reader, alpha: float) -> None:
        self.lut = np.zeros((256, 3), dtype=np.uint8)
        self.lut[: len(colors)] = np.asarray(colors, dtype=np.uint8)
        self.reader = reader
        self.alpha = alpha

    def render(self, kind: str, block: Block) -> np.ndarray:
        """Pixels of output ``kind`` for ``block``; nodata is black, 0 or the input itself (overlay)."""
        if kind == "mask":
            return block.labels[:, :, None]
        if kind == "confidence":
            return np.round(block.confidence * 255.0).astype(np.uint8)[:, :, None]
        colors = self.lut[block.labels]
        if kind == "color":
            return colors
        h, w = block.labels.shape
        image = _to_uint8(self.reader.read(block.y, block.x, h, w), self.reader.scale)
        blended = (1.0 - self.alpha) * image + self.alpha * colors
        return np.where(block.valid[:, :, None], blended.round().astype(np.uint8), image)


class Outputs(Protocol):
    """A set of outputs being written for one input."""

    def write(self, block: Block) -> None:
        """Store one finished block."""

    def commit(self) -> None:
        """Finish every output and move it to its final name."""

    def abort(self) -> None:
        """Remove whatever was written."""


def _remove_partials(paths: dict[str, Path]) -> None:
    for path in paths.values():
        partial_path(path).unlink(missing_ok=True)


class PngOutputs:
    """Outputs of an in-memory image, assembled in memory and saved as PNGs at the end."""

    def __init__(self, paths: dict[str, Path], renderer: Renderer, height: int, width: int) -> None:
        self.paths = {k: p for k, p in paths.items() if k in KINDS}
        self.renderer = renderer
        self.arrays = {k: np.zeros((height, width, 1 if k in ("mask", "confidence") else 3), dtype=np.uint8)
                       for k in self.paths}

    def write(self, block: Block) -> None:
        h, w = block.labels.shape
        for kind, array in self.arrays.items():
            array[block.y:block.y + h, block.x:block.x + w] = self.renderer.render(kind, block)

    def commit(self) -> None:
        from PIL import Image

        try:
            for kind, path in self.paths.items():
                array = self.arrays[kind]
                Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(partial_path(path), "PNG")
        except BaseException:
            self.abort()
            raise
        for path in self.paths.values():
            os.replace(partial_path(path), path)

    def abort(self) -> None:
        _remove_partials(self.paths)


def _tiff_profile(kind: str, reader: Reader, ignore_index: int) -> dict[str, Any]:
    """GeoTIFF creation options: input grid and georeferencing, tiled and compressed."""
    geo = reader.geo
    profile: dict[str, Any] = dict(
        driver="GTiff", width=reader.width, height=reader.height, dtype="uint8",
        count=1 if kind in ("mask", "confidence") else 3, crs=geo.crs if geo else None,
        transform=geo.transform if geo and not geo.transform.is_identity else None, tiled=True, blockxsize=TIFF_BLOCK, blockysize=TIFF_BLOCK,
        compress="deflate", BIGTIFF="IF_SAFER")
    if kind == "mask":
        profile["nodata"] = ignore_index
    elif kind == "confidence":
        profile["nodata"] = 0
    else:
        profile["photometric"] = "RGB"
    return profile


@contextlib.contextmanager
def _gdal_write_errors(paths: dict[str, Path]) -> Iterator[None]:
    """GDAL's write failures (a full disk) as a PredictError naming the output folder (they are not OSErrors)."""
    from rasterio._err import CPLE_BaseError
    from rasterio.errors import RasterioError

    try:
        yield
    except (CPLE_BaseError, RasterioError) as exc:
        if isinstance(exc, OSError):
            raise
        folder = next(iter(paths.values())).parent
        raise PredictError(f"{folder}: cannot write the GeoTIFF outputs: {exc}") from exc


class GeoTiffOutputs:
    """Outputs of a raster, written window by window; rows are buffered into whole TIFF strips."""

    def __init__(self, paths: dict[str, Path], renderer: Renderer, reader: Reader, ignore_index: int,
                 colors: list[tuple[int, int, int]]) -> None:
        import rasterio

        self.paths = {k: p for k, p in paths.items() if k in KINDS}
        self.renderer = renderer
        self.datasets: dict[str, Any] = {}
        self.pending: list[Block] = []
        try:
            with _gdal_write_errors(self.paths):
                for kind, path in self.paths.items():
                    dst = rasterio.open(partial_path(path), "w", **_tiff_profile(kind, reader, ignore_index))
                    self.datasets[kind] = dst
                    if kind == "mask":
                        dst.write_colormap(1, {i: (*c, 255) for i, c in enumerate(colors)})
        except BaseException:
            self.abort()
            raise

    def write(self, block: Block) -> None:
        with _gdal_write_errors(self.paths):
            if self.pending and self.pending[0].x != block.x:
                self._flush(everything=True)
            self.pending.append(block)
            if sum(b.labels.shape[0] for b in self.pending) >= TIFF_BLOCK:
                self._flush(everything=False)

    def _flush(self, everything: bool) -> None:
        """Write the pending rows: all of them, or the largest whole number of TIFF strips."""
        if not self.pending:
            return
        from rasterio.windows import Window

        y, x = self.pending[0].y, self.pending[0].x
        merged = Block(y, x, *(np.concatenate([getattr(b, f) for b in self.pending])
                               for f in ("labels", "confidence", "valid")))
        rows = merged.labels.shape[0] if everything else merged.labels.shape[0] // TIFF_BLOCK * TIFF_BLOCK
        head = Block(y, x, merged.labels[:rows], merged.confidence[:rows], merged.valid[:rows])
        window = Window(x, y, head.labels.shape[1], rows)
        for kind, dst in self.datasets.items():
            dst.write(np.moveaxis(self.renderer.render(kind, head), -1, 0), window=window)
        rest = merged.labels.shape[0] - rows
        self.pending = [] if rest == 0 else [
            Block(y + rows, x, merged.labels[rows:], merged.confidence[rows:], merged.valid[rows:])]

    def commit(self) -> None:
        try:
            with _gdal_write_errors(self.paths):
                self._flush(everything=True)
                for dst in self.datasets.values():
                    dst.close()
        except BaseException:
            self.abort()
            raise
        for path in self.paths.values():
            os.replace(partial_path(path), path)

    def abort(self) -> None:
        for dst in self.datasets.values():
            if not dst.closed:
                dst.close()
        _remove_partials(self.paths)


def open_outputs(paths: dict[str, Path], reader: Reader, cfg: PredictConfig, colors: list[tuple[int, int, int]],
                 ignore_index: int) -> Outputs:
    """PNG outputs for in-memory images, GeoTIFF outputs for rasters (chosen by the paths' suffix)."""
    renderer = Renderer(colors, reader, cfg.overlay_alpha)
    if paths["mask"].suffix == ".tif":
        return GeoTiffOutputs(paths, renderer, reader, ignore_index, colors)
    return PngOutputs(paths, renderer, reader.height, reader.width)
