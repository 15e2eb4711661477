"""Map-ready class rasters: a QGIS style beside each, and the cloud-optimised GeoTIFF variant (``--cog``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence
from xml.etree import ElementTree

from distseg.inference.errors import PredictError


def qml(names: Sequence[str], colors: Sequence[tuple[int, int, int]], ignore_index: int) -> str:
    """A QGIS layer style (.qml) that draws band 1 as a paletted raster with the class names and colours.

    ``ignore_index`` (the nodata value) gets no entry, so QGIS leaves it transparent.
    """
    root = ElementTree.Element("qgis", version="3.28", styleCategories="AllStyleCategories")
    pipe = ElementTree.SubElement(root, "pipe")
    renderer = ElementTree.SubElement(pipe, "rasterrenderer", type="paletted", band="1", opacity="1",
                                      alphaBand="-1", nodataColor="")
    ElementTree.SubElement(renderer, "rasterTransparency")
    palette = ElementTree.SubElement(renderer, "colorPalette")
    for index, (name, (r, g, b)) in enumerate(zip(names, colors)):
        if index != ignore_index:
            ElementTree.SubElement(palette, "paletteEntry", value=str(index), color=f"#{r:02x}{g:02x}{b:02x}",
                                   alpha="255", label=name)
    ElementTree.SubElement(root, "blendMode").text = "0"
    ElementTree.indent(root)
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + ElementTree.tostring(root, "unicode") + "\n"


def write_qml(path: Path, names: Sequence[str], colors: Sequence[tuple[int, int, int]], ignore_index: int) -> None:
    """Write the style atomically (QGIS loads ``<raster stem>.qml`` with the raster on its own)."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(qml(names, colors, ignore_index))
    os.replace(tmp, path)


def convert_to_cog(path: Path) -> None:
    """Rewrite a finished GeoTIFF class raster as a cloud-optimised GeoTIFF, in place.

    GDAL's COG driver tiles it 256 × 256, deflate-compresses it and adds overviews down to one tile. The
    overviews use *mode* resampling, the right one for class indices (an average of classes 1 and 3 is not
    class 2); the colour table, nodata value, CRS and transform are copied.
    """
    from rasterio._err import CPLE_BaseError
    from rasterio.errors import RasterioError
    from rasterio.shutil import copy

    tmp = path.with_name(f".{path.name}.cog.partial")
    try:
        copy(path, tmp, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=256, OVERVIEW_RESAMPLING="MODE",
             BIGTIFF="IF_SAFER")
    except (CPLE_BaseError, RasterioError) as exc:
        tmp.unlink(missing_ok=True)
        raise PredictError(f"{path}: cannot write the cloud-optimised GeoTIFF: {exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
