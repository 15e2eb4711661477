"""Input readers: plain images held in memory, GeoTIFFs read window by window.

A reader exposes the raster size, reads any in-bounds window as H×W×3 (native dtype) plus a
validity mask, and carries what the writers need to georeference outputs. Band selection and
the scale to [0, 1] are settled when the reader is opened, so bad input fails before any work.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from distseg.inference.errors import PredictError
from distseg.limits import MAX_PIXELS, check_pixels, pil_cap_off

WEB_MERCATOR_RADIUS = 6378137.0
"""The sphere radius of EPSG:3857, in metres."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
RASTER_SUFFIXES = (".tif", ".tiff")
SUPPORTED_SUFFIXES = IMAGE_SUFFIXES + RASTER_SUFFIXES


@dataclasses.dataclass(frozen=True)
class GeoInfo:
    """Georeferencing copied from the input to every GeoTIFF output."""

    crs: Any
    """rasterio CRS, or None when the file has none."""
    transform: Any
    """rasterio Affine pixel -> map transform."""

    @property
    def pixel_area_m2(self) -> float | None:
        """Ground area of one pixel in m², or None when the CRS is missing or not in linear units.

        Web Mercator (EPSG:3857, what web-map tiles and ``--georef-from-name`` use) stretches lengths by 1/cos(φ), so
        its map area is scaled back by cos²(φ) at the raster's top-left corner: exact for a chip, and across a large
        mosaic off by the change of cos² over its latitude span.
        """
        if self.crs is None or not self.crs.is_projected:
            return None
        _, metres_per_unit = self.crs.linear_units_factor
        area = abs(self.transform.a * self.transform.e - self.transform.b * self.transform.d) * metres_per_unit ** 2
        if self.crs.to_epsg() == 3857:
            latitude = 2 * math.atan(math.exp(self.transform.f / WEB_MERCATOR_RADIUS)) - math.pi / 2
            area *= math.cos(latitude) ** 2
        return area


class Reader(Protocol):
    """What the sliding-window engine and the writers need from an input."""

    path: Path
    height: int
    width: int
    scale: float
    geo: GeoInfo | None

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Pixels of an in-bounds window, h × w × 3, native dtype."""

    def read_valid(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Boolean h × w mask: False where the input is nodata."""

    def close(self) -> None:
        """Release the file."""


def _select_bands(count: int, bands: Sequence[int] | None, path: Path) -> list[int]:
    """0-based indices of the three bands to use; an error says how to choose them."""
    if bands is None:
        if count != 3:
            raise PredictError(f"{path}: has {count} band(s), the model needs 3; choose them with "
                               f"--bands (1-based, e.g. --bands 1,2,3)")
        return [0, 1, 2]
    if len(bands) != 3:
        raise PredictError(f"{path}: --bands needs exactly 3 band numbers, got {list(bands)}")
    bad = [b for b in bands if not 1 <= b <= count]
    if bad:
        raise PredictError(f"{path}: --bands {list(bands)} out of range; the file has bands 1..{count}")
    return [b - 1 for b in bands]


def _default_scale(dtype: np.dtype, scale: float | None, path: Path) -> float:
    """The input value that maps to 1.0: 255 for 8-bit data, else it must be given."""
    if scale is not None:
        if scale <= 0:
            raise PredictError(f"{path}: --scale must be positive, got {scale}")
        return float(scale)
    if dtype == np.uint8:
        return 255.0
    raise PredictError(f"{path}: pixels are {dtype}, not uint8; pass --scale with the value that means full "
                       f"brightness (e.g. 4095 for 12-bit or 65535 for 16-bit data)")


def finite_pixels(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Float pixels with NaN/±inf replaced by 0, and where they were finite (None: integer data, all finite).

    A non-finite input value is nodata: it is excluded from the output and, zeroed, cannot poison the
    probabilities of the valid pixels that share its window.
    """
    if pixels.dtype.kind != "f":
        return pixels, None
    finite = np.isfinite(pixels).all(axis=-1)
    if finite.all():
        return pixels, None
    return np.where(finite[..., None], pixels, 0).astype(pixels.dtype, copy=False), finite


class ArrayReader:
    """A whole image held in memory (PNG/JPEG files, or arrays passed to ``predict_array``)."""

    def __init__(self, image: np.ndarray, path: Path | str = "<array>", valid: np.ndarray | None = None,
                 scale: float | None = None) -> None:
        self.path = Path(path)
        if image.ndim != 3 or image.shape[2] != 3:
            raise PredictError(f"{self.path}: expected an H×W×3 image, got shape {image.shape}")
        if valid is not None and valid.shape != image.shape[:2]:
            raise PredictError(f"{self.path}: valid mask shape {valid.shape} != image size {image.shape[:2]}")
        image, finite = finite_pixels(image)
        if finite is not None:
            valid = finite if valid is None else valid & finite
        self.image = image
        self.valid = valid
        self.height, self.width = image.shape[:2]
        self.scale = 1.0 if image.dtype.kind == "f" and scale is None else _default_scale(image.dtype, scale, self.path)
        self.geo: GeoInfo | None = None

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self.image[y:y + h, x:x + w]

    def read_valid(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        if self.valid is None:
            return np.ones((h, w), dtype=bool)
        return self.valid[y:y + h, x:x + w]

    def close(self) -> None:
        """Nothing to release."""


def _load_image(path: Path, bands: Sequence[int] | None, scale: float | None, max_pixels: int) -> ArrayReader:
    """Decode a PNG/JPEG; palette images count as RGB, other modes by their channel count."""
    from PIL import Image

    try:
        with pil_cap_off():
            img = Image.open(path)
        with img:
            problem = check_pixels(*img.size, max_pixels)
            if problem:
                raise PredictError(f"{path}: {problem}; or convert it to a tiled GeoTIFF (e.g. gdal_translate -co "
                                   f"TILED=YES) so it is read window by window")
            if img.mode == "P":
                img = img.convert("RGB")
            array = np.asarray(img)
    except OSError as exc:
        raise PredictError(f"{path}: cannot read image: {exc}") from None
    if array.ndim == 2:
        array = array[:, :, None]
    picked = _select_bands(array.shape[2], bands, path)
    return ArrayReader(np.ascontiguousarray(array[:, :, picked]), path, scale=scale)


class RasterioReader:
    """A GeoTIFF read window by window, so it may be far larger than memory."""

    def __init__(self, path: Path, bands: Sequence[int] | None, scale: float | None) -> None:
        try:
            import rasterio
        except ImportError:
            raise PredictError(f"{path}: reading GeoTIFFs needs rasterio (a distseg dependency): pip install rasterio") from None

        self.path = path
        try:
            self.dataset = rasterio.open(path)
        except rasterio.errors.RasterioIOError as exc:
            raise PredictError(f"{path}: cannot open raster: {exc}") from None
        try:
            self.bands = [b + 1 for b in _select_bands(self.dataset.count, bands, path)]
            dtypes = {self.dataset.dtypes[b - 1] for b in self.bands}
            if len(dtypes) != 1:
                raise PredictError(f"{path}: selected bands have different types {sorted(dtypes)}")
            dtype = np.dtype(dtypes.pop())
            self.scale = _default_scale(dtype, scale, path)
            self.float_data = dtype.kind == "f"
        except PredictError:
            self.dataset.close()
            raise
        self.height, self.width = self.dataset.height, self.dataset.width
        self.geo = GeoInfo(self.dataset.crs, self.dataset.transform)

    def _window(self, y: int, x: int, h: int, w: int) -> Any:
        from rasterio.windows import Window

        return Window(x, y, w, h)

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The window's pixels, non-finite float values zeroed (they are nodata: :meth:`read_valid`)."""
        return finite_pixels(self._read(y, x, h, w))[0]

    def _read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return np.moveaxis(self.dataset.read(self.bands, window=self._window(y, x, h, w)), 0, -1)

    def read_valid(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Valid where any selected band is valid (GDAL masks: nodata value, alpha or mask band) and every selected
        band is finite (a float raster's NaN/inf pixels are nodata even without a nodata value)."""
        masks = self.dataset.read_masks(self.bands, window=self._window(y, x, h, w))
        valid = masks.max(axis=0) > 0
        if self.float_data:
            finite = finite_pixels(self._read(y, x, h, w))[1]
            if finite is not None:
                valid &= finite
        return valid

    def close(self) -> None:
        self.dataset.close()


def gdal_env(path: Path, cache_mb: int) -> contextlib.AbstractContextManager:
    """GDAL settings for one raster job: a fixed block cache (GDAL's default is 5 % of RAM, which would make
    peak memory grow with the raster until that much is cached). Plain images need no GDAL."""
    if path.suffix.lower() not in RASTER_SUFFIXES:
        return contextlib.nullcontext()
    try:
        import rasterio
    except ImportError:
        return contextlib.nullcontext()  # open_reader reports the missing package with the file name
    return rasterio.Env(GDAL_CACHEMAX=cache_mb * 2**20)


def open_reader(path: str | Path, bands: Sequence[int] | None = None, scale: float | None = None,
                max_pixels: int = MAX_PIXELS) -> Reader:
    """Open an input by suffix: PNG/JPEG in memory (at most ``max_pixels``), TIFF/GeoTIFF windowed."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise PredictError(f"{path}: unsupported file type {suffix or '(none)'!r}; "
                           f"supported: {', '.join(SUPPORTED_SUFFIXES)}")
    if not path.is_file():
        raise PredictError(f"{path}: no such file")
    if suffix in RASTER_SUFFIXES:
        return RasterioReader(path, bands, scale)
    return _load_image(path, bands, scale, max_pixels)


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files and folders -> the files to predict (folders: supported, non-hidden files, sorted, not recursive)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir()
                           if f.is_file() and f.suffix.lower() in SUPPORTED_SUFFIXES and not f.name.startswith("."))
            if not found:
                raise PredictError(f"{p}: folder holds no {'/'.join(SUPPORTED_SUFFIXES)} files")
            files.extend(found)
        elif not p.exists():
            raise PredictError(f"{p}: no such file or folder")
        elif p.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise PredictError(f"{p}: unsupported file type {p.suffix or '(none)'!r}; "
                               f"supported: {', '.join(SUPPORTED_SUFFIXES)}")
        else:
            files.append(p)
    return files
