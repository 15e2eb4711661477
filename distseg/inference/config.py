"""Settings of ``distseg predict``."""
from __future__ import annotations

import dataclasses
from typing import Literal

from distseg.inference.objects import ObjectsConfig
from distseg.inference.vector import VectorConfig
from distseg.limits import MAX_PIXELS

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class PredictConfig:
    """How to tile, run and write one prediction job (the CLI options, as a typed config)."""

    tile: int = 512
    """Window size in pixels (square); smaller images use one window of their own size."""
    overlap: float = 0.25
    """Fraction of the tile that neighbouring windows share; blending ramps span this overlap."""
    batch_size: int = 4
    """Windows per forward pass."""
    tta: bool = False
    """Average the probabilities over horizontal, vertical and both flips (4 passes per window)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Autocast dtype of the forward pass; probabilities are always accumulated in float32."""
    device: str = "auto"
    """Torch device; "auto" picks cuda:LOCAL_RANK when CUDA is available, else cpu."""
    chunk_width: int = 4096
    """Columns processed at once: accumulators hold (classes + 1) × tile × chunk_width floats, so peak
    memory does not grow with the raster; windows across a chunk boundary are computed twice."""
    gdal_cache_mb: int = 64
    """GDAL block cache for GeoTIFF reads and writes, in MiB (bounds memory together with chunk_width)."""
    size_multiple: int = 32
    """Windows of images smaller than a tile are rounded up to this multiple (the backbone stride)."""
    bands: tuple[int, int, int] | None = None
    """1-based input bands to use as RGB; None requires a 3-band input."""
    scale: float | None = None
    """Input value that maps to 1.0; None means 255 for uint8 inputs (other types must set it)."""
    color: bool = True
    """Also write the prediction coloured with the class map's colours."""
    overlay: bool = False
    """Also write the colours blended over the input image."""
    overlay_alpha: float = 0.5
    """Opacity of the class colours in the overlay."""
    confidence: bool = False
    """Also write the per-pixel confidence (blended probability of the predicted class, 0-255)."""
    force: bool = False
    """Overwrite existing outputs instead of refusing."""
    max_pixels: int = MAX_PIXELS
    """Refuse a PNG/JPEG whose header claims more pixels (it is decoded whole); GeoTIFFs are read by windows."""
    vector: VectorConfig | None = None
    """Also write the class regions as polygons into one GeoPackage/GeoJSON file (``--vector``)."""
    cog: bool = False
    """Write the class raster (mask) as a cloud-optimised GeoTIFF with mode-resampled overviews."""
    georef_from_name: bool = False
    """Place PNG/JPEG chips named ``...<x>-<y>-<z>`` on their web-map tile (EPSG:3857); their outputs are then
    GeoTIFFs."""
    adapt_bn: bool = False
    """Re-estimate the model's BatchNorm statistics on the inputs before predicting them (AdaBN, one forward pass
    per non-overlapping window): for imagery of another place than the labels (inference/adapt.py)."""
    objects: ObjectsConfig | None = None
    """Score the predictions against ground-truth masks, per object and per pixel (``--truth``, ``--objects``)."""

    def __post_init__(self) -> None:
        if self.tile < 16:
            raise ValueError(f"tile must be at least 16 pixels, got {self.tile}")
        if not 0.0 <= self.overlap < 0.9:
            raise ValueError(f"overlap must be a fraction in [0, 0.9), got {self.overlap}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.chunk_width < self.tile:
            raise ValueError(f"chunk_width ({self.chunk_width}) must be at least the tile ({self.tile})")
        if self.gdal_cache_mb < 1:
            raise ValueError(f"gdal_cache_mb must be positive, got {self.gdal_cache_mb}")
        if self.size_multiple < 1:
            raise ValueError(f"size_multiple must be positive, got {self.size_multiple}")
        if self.bands is not None and (len(self.bands) != 3 or min(self.bands) < 1):
            raise ValueError(f"bands must be three 1-based band numbers, got {self.bands}")
        if self.scale is not None and self.scale <= 0:
            raise ValueError(f"scale must be positive, got {self.scale}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        if not 0.0 <= self.overlay_alpha <= 1.0:
            raise ValueError(f"overlay_alpha must be in [0, 1], got {self.overlay_alpha}")

    @property
    def overlap_pixels(self) -> int:
        """The overlap in pixels for a full tile."""
        return round(self.tile * self.overlap)
