"""Georeferencing for web-map tile chips (``--georef-from-name``) and the check that vector outputs have one.

Drone chips cut on the web-map grid (OpenAerialMap, HOT fAIr training data) are plain PNG/JPEG files whose
name ends in the tile's ``<x>-<y>-<z>`` (the XYZ scheme: x from the west, y from the north, zoom z). That
name fixes the chip's square on the map exactly: at zoom z the EPSG:3857 square of half-width
20 037 508.34 m is cut into 2^z × 2^z tiles, so the chip's bounds, and with its pixel size its affine
transform, follow from x, y and z.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from distseg.inference.errors import PredictError
from distseg.inference.raster import RASTER_SUFFIXES, GeoInfo

WEB_MERCATOR_HALF = 20037508.342789244
"""Half the width of the EPSG:3857 world square, in metres (π × 6 378 137)."""
TILE_NAME = re.compile(r"(\d+)-(\d+)-(\d+)$")
"""``<x>-<y>-<z>`` at the end of a file stem."""


def tile_of(path: Path) -> tuple[int, int, int]:
    """(x, y, z) from a name like ``nairobi_OAM-1263582-1056186-21.jpg``; a PredictError when it has none."""
    match = TILE_NAME.search(path.stem)
    if not match:
        raise PredictError(f"{path}: --georef-from-name needs a name ending in the web-map tile <x>-<y>-<z>, "
                           f"e.g. site_OAM-1263582-1056186-21.jpg")
    x, y, z = map(int, match.groups())
    if not (z <= 30 and x < 2 ** z and y < 2 ** z):
        raise PredictError(f"{path}: tile {x}-{y}-{z} is outside the web-map grid (x and y must be below 2^z)")
    return x, y, z


def tile_geo(path: Path, width: int, height: int) -> GeoInfo:
    """EPSG:3857 georeferencing of a ``width`` × ``height`` chip that covers the tile in its name."""
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    x, y, z = tile_of(path)
    size = 2 * WEB_MERCATOR_HALF / 2 ** z
    transform = from_origin(-WEB_MERCATOR_HALF + x * size, WEB_MERCATOR_HALF - y * size, size / width, size / height)
    return GeoInfo(CRS.from_epsg(3857), transform)


def is_georeferenced(geo: GeoInfo | None) -> bool:
    """Whether outputs can be placed on a map: a CRS and a non-identity transform."""
    return geo is not None and geo.crs is not None and not geo.transform.is_identity


def check_georeferenced(files: Sequence[Path], from_name: bool, option: str) -> None:
    """Fail before any work when an input of ``option`` (e.g. --vector) cannot be placed on a map."""
    import rasterio

    for path in files:
        if path.suffix.lower() in RASTER_SUFFIXES:
            try:
                with rasterio.open(path) as src:
                    geo = GeoInfo(src.crs, src.transform)
            except rasterio.errors.RasterioIOError as exc:
                raise PredictError(f"{path}: cannot open raster: {exc}") from None
            if is_georeferenced(geo) or from_name:
                if not is_georeferenced(geo):
                    tile_of(path)
                continue
        elif from_name:
            tile_of(path)
            continue
        raise not_georeferenced(path, option)


def not_georeferenced(path: Path, option: str) -> PredictError:
    """The error for an input that ``option`` needs on a map but that has no CRS or transform."""
    return PredictError(f"{path}: has no georeferencing (CRS and transform), which {option} needs; use a GeoTIFF, "
                        f"or --georef-from-name for web-map tile chips named <x>-<y>-<z>")
