"""``distseg predict --vector``: the predicted classes as polygons in a GeoPackage or GeoJSON file.

Regions are traced block by block while the prediction streams (:mod:`distseg.inference.polygonize`),
cleaned in pixel space (:mod:`distseg.inference.outline`), then placed on the map with the raster's
transform and written with fiona as they are finished. One file holds the polygons of every input, each
with its class, mean confidence, area (m²), perimeter (m), pixel count and source file.

- A GeoPackage is in the first input's CRS (later inputs in another CRS are reprojected into it); a GeoJSON
  file is in EPSG:4326 (longitude, latitude), as RFC 7946 requires.
- Areas and perimeters are measured in metres in a projected CRS: the raster's own when it is projected and
  not Mercator (whose scale grows away from the equator), otherwise the UTM zone of the raster's centre.
- The file is written under a hidden partial name and renamed when every input is done.

shapely, fiona and scipy come with the ``geo`` extra (``pip install 'distseg[geo]'``) and are imported only
when vectors are asked for.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from distseg.inference.errors import PredictError

FORMATS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}
"""Output suffix -> OGR driver."""
GEOJSON_CRS = "EPSG:4326"
_BATCH = 512
"""Features buffered before one write call."""
_AMOUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(px)?\s*$")


def parse_amount(text: str, option: str) -> tuple[float, bool]:
    """'1.5px' -> (1.5, True: pixels); '0.3' -> (0.3, False: map units or m²)."""
    match = _AMOUNT.match(text)
    if not match:
        raise PredictError(f"{option} {text!r}: expected a non-negative number, optionally ending in px "
                           f"(e.g. {option} 0.5 or {option} 2px)")
    return float(match.group(1)), match.group(2) is not None


def require_geo_packages(option: str = "--vector", modules: Sequence[str] = ("shapely", "fiona", "scipy")) -> None:
    """One clear line when a package of the ``geo`` extra that ``option`` needs is missing."""
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            raise PredictError(f"{option} needs the {module} package: pip install 'distseg[geo]'") from None


@dataclasses.dataclass
class VectorConfig:
    """What ``--vector`` writes and how the outlines are cleaned."""

    path: Path
    """Output file: .gpkg (GeoPackage, the raster's CRS) or .geojson (EPSG:4326)."""
    classes: tuple[str, ...] | None = None
    """Class names to vectorise; None: every class."""
    simplify: float = 1.0
    """Douglas-Peucker tolerance (0: exact pixel outlines), in pixels or map units (``simplify_in_pixels``)."""
    simplify_in_pixels: bool = True
    """Whether ``simplify`` is in pixels; otherwise it is in the raster CRS's units (metres when projected)."""
    min_area: float = 0.0
    """Polygons smaller than this are dropped: m², or pixels when ``min_area_in_pixels``."""
    min_area_in_pixels: bool = False
    """Whether ``min_area`` counts pixels instead of m²."""
    fill_holes: bool = False
    """Drop the holes of every polygon (a courtyard becomes part of the building)."""
    regularize: tuple[str, ...] = ()
    """Classes whose outlines get right angles (:func:`distseg.inference.outline.regularize`), e.g. building."""

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.path.suffix.lower() not in FORMATS:
            raise ValueError(f"--vector {self.path}: unsupported format {self.path.suffix or '(none)'!r}; "
                             f"use .gpkg or .geojson")
        if self.simplify < 0 or self.min_area < 0:
            raise ValueError(f"--simplify and --min-area must not be negative, got {self.simplify}, {self.min_area}")

    @property
    def driver(self) -> str:
        return FORMATS[self.path.suffix.lower()]

    def class_indices(self, names: Sequence[str]) -> tuple[list[int], set[int]]:
        """Indices of the classes to vectorise and of those to regularise; unknown names are a PredictError."""
        for option, wanted in (("--vector-classes", self.classes or ()), ("--regularize", self.regularize)):
            unknown = [n for n in wanted if n not in names]
            if unknown:
                raise PredictError(f"{option}: unknown class {unknown[0]!r}; the class map has "
                                   f"{', '.join(names)}")
        chosen = [names.index(n) for n in self.classes] if self.classes else list(range(len(names)))
        return chosen, {names.index(n) for n in self.regularize}


def vector_partial(path: Path) -> Path:
    """Hidden name the file is written under (the suffix is kept: GDAL picks formats by it)."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def check_vector_output(cfg: VectorConfig, force: bool) -> None:
    """Fail before any work when the vector file exists (without --force) or its folder cannot be written."""
    import tempfile

    if cfg.path.exists() and not force:
        raise PredictError(f"{cfg.path}: output exists; pass --force to overwrite")
    folder = cfg.path.parent
    if not folder.is_dir():
        raise PredictError(f"{cfg.path}: folder {folder} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".distseg-probe-"):
            pass
    except OSError as exc:
        raise PredictError(f"{cfg.path}: cannot write there: {exc.strerror or exc}") from None


def _reprojector(src: Any, dst: Any):
    """A function moving shapely geometries from CRS ``src`` to ``dst`` (GDAL's transformation), or None."""
    if src == dst:
        return None
    import shapely
    from rasterio.warp import transform

    def move(geometry):
        def points(xy: np.ndarray) -> np.ndarray:
            xs, ys = transform(src, dst, xy[:, 0], xy[:, 1])
            return np.column_stack([xs, ys])

        return shapely.transform(geometry, points)

    return move


def measuring_crs(geo: Any, height: int, width: int) -> tuple[Any, float]:
    """The CRS areas and lengths are measured in, and its metres per unit (see the module docstring)."""
    from rasterio.crs import CRS
    from rasterio.warp import transform

    crs = geo.crs
    if crs.is_projected and crs.to_dict().get("proj") != "merc":
        return crs, crs.linear_units_factor[1]
    x, y = geo.transform @ (width / 2, height / 2)
    (lon,), (lat,) = transform(crs, GEOJSON_CRS, [x], [y])
    zone = min(int((lon + 180) // 6) + 1, 60)
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone), 1.0


@dataclasses.dataclass
class RasterVectors:
    """How the regions of one raster become features of the output layer."""

    source: str
    """Input file name, written into every feature."""
    names: list[str]
    transform: Any
    """Pixel -> raster CRS affine transform."""
    to_layer: Any
    """Raster CRS -> layer CRS (None: the same)."""
    to_metric: Any
    """Raster CRS -> measuring CRS (None: the same)."""
    metres_per_unit: float
    tolerance_px: float
    square: set[int]
    cfg: VectorConfig

    def features(self, region: Any) -> list[dict[str, Any]]:
        """The output features of one region (one per polygon left after cleaning and the area filter)."""
        import shapely
        from shapely import affinity
        from shapely.geometry import mapping

        from distseg.inference.outline import clean

        if self.cfg.min_area_in_pixels and region.pixels < self.cfg.min_area:
            return []
        cleaned = clean(region.geometry, self.tolerance_px, self.cfg.fill_holes, region.class_index in self.square)
        t = self.transform
        out = []
        for part in shapely.get_parts(cleaned):
            if part.geom_type != "Polygon" or part.is_empty:
                continue
            on_map = affinity.affine_transform(part, [t.a, t.b, t.d, t.e, t.c, t.f])
            metric = self.to_metric(on_map) if self.to_metric else on_map
            area = metric.area * self.metres_per_unit ** 2
            if not self.cfg.min_area_in_pixels and area < self.cfg.min_area:
                continue
            geometry = self.to_layer(on_map) if self.to_layer else on_map
            out.append({"geometry": mapping(geometry), "properties": {
                "class": self.names[region.class_index],
                "confidence": round(region.confidence_sum / region.pixels, 4),
                "area_m2": round(area, 3),
                "perimeter_m": round(metric.length * self.metres_per_unit, 3),
                "pixels": region.pixels,
                "source": self.source}})
        return out


class VectorWriter:
    """The one vector file of a predict job: opened at the first raster, renamed into place by :meth:`commit`."""

    def __init__(self, cfg: VectorConfig, names: list[str]) -> None:
        self.cfg = cfg
        self.names = names
        self.class_indices, self.square = cfg.class_indices(names)
        self.layer = None
        self.crs = None
        self.buffer: list[dict[str, Any]] = []
        self.count = 0

    def begin(self, source: Path, geo: Any, height: int, width: int) -> RasterVectors:
        """Open the layer on first use (its CRS: the first raster's, or EPSG:4326 for GeoJSON) and describe
        how this raster's regions become features."""
        from distseg.inference.georef import is_georeferenced, not_georeferenced

        if not is_georeferenced(geo):
            raise not_georeferenced(source, "--vector")
        if self.layer is None:
            self._open(geo.crs)
        metric_crs, factor = measuring_crs(geo, height, width)
        pixel = math.sqrt(abs(geo.transform.determinant))
        tolerance = self.cfg.simplify if self.cfg.simplify_in_pixels else self.cfg.simplify / pixel
        return RasterVectors(source.name, self.names, geo.transform, _reprojector(geo.crs, self.crs),
                             _reprojector(geo.crs, metric_crs), factor, tolerance, self.square, self.cfg)

    def _open(self, raster_crs: Any) -> None:
        import fiona
        from fiona.errors import FionaError
        from rasterio.crs import CRS

        self.crs = CRS.from_string(GEOJSON_CRS) if self.cfg.driver == "GeoJSON" else raster_crs
        schema = {"geometry": "Polygon", "properties": {
            "class": "str", "confidence": "float", "area_m2": "float", "perimeter_m": "float", "pixels": "int",
            "source": "str"}}
        options = {"RFC7946": "YES"} if self.cfg.driver == "GeoJSON" else {}
        partial = vector_partial(self.cfg.path)
        partial.unlink(missing_ok=True)
        try:
            self.layer = fiona.open(partial, "w", driver=self.cfg.driver, schema=schema, crs=self.crs.to_wkt(),
                                    layer=self.cfg.path.stem if self.cfg.driver == "GPKG" else None, **options)
        except (FionaError, OSError) as exc:
            partial.unlink(missing_ok=True)
            raise PredictError(f"{self.cfg.path}: cannot create the vector file: {exc}") from None

    def write(self, features: list[dict[str, Any]]) -> None:
        """Queue features; they reach the file in batches."""
        self.buffer += features
        if len(self.buffer) >= _BATCH:
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            self.layer.writerecords(self.buffer)
            self.count += len(self.buffer)
            self.buffer = []

    def commit(self) -> int:
        """Finish the file and give it its real name; returns the number of features."""
        if self.layer is None:
            return 0
        try:
            self._flush()
            self.layer.close()
        except BaseException:
            self.abort()
            raise
        os.replace(vector_partial(self.cfg.path), self.cfg.path)
        return self.count

    def abort(self) -> None:
        """Remove the partial file."""
        if self.layer is not None and not self.layer.closed:
            self.layer.close()
        vector_partial(self.cfg.path).unlink(missing_ok=True)
