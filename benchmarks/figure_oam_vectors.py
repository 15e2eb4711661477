"""Render predicted building polygons over a block of web-map drone chips (the picture in the README).

    python benchmarks/figure_oam_vectors.py PRED.gpkg IMAGES/ MASKS/ OUT.png --x 1238456:1238459 --y 1046530:1046533

Chips named ``<site>_OAM-<x>-<y>-<z>`` in the given x and y ranges (inclusive, one zoom) are mosaicked on their
web-map tiles; the polygons of ``distseg predict --vector`` (any CRS) are drawn over them in orange, and the
ground-truth outlines (the masks' building pixels) in cyan.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    import fiona
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import PathPatch
    from matplotlib.path import Path as MplPath
    from PIL import Image
    from rasterio.crs import CRS
    from rasterio.warp import transform as warp
    from shapely.geometry import shape

    from distseg.inference.georef import tile_geo, tile_of

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("vectors", "images", "masks", "out"):
        parser.add_argument(name, type=Path)
    parser.add_argument("--x", required=True, help="first:last tile column")
    parser.add_argument("--y", required=True, help="first:last tile row")
    args = parser.parse_args()
    (x0, x1), (y0, y1) = (tuple(map(int, r.split(":"))) for r in (args.x, args.y))
    chips = {tile_of(p)[:2]: p for p in sorted(args.images.iterdir())
             if p.suffix in (".png", ".jpg") and x0 <= tile_of(p)[0] <= x1 and y0 <= tile_of(p)[1] <= y1}
    size = Image.open(next(iter(chips.values()))).size[0]
    mosaic = np.zeros(((y1 - y0 + 1) * size, (x1 - x0 + 1) * size, 3), np.uint8)
    truth = np.zeros(mosaic.shape[:2], np.uint8)
    for (x, y), path in chips.items():
        r, c = (y - y0) * size, (x - x0) * size
        mosaic[r:r + size, c:c + size] = np.asarray(Image.open(path).convert("RGB"))
        truth[r:r + size, c:c + size] = np.asarray(Image.open(args.masks / f"{path.stem}.png")) == 1
    corner = tile_geo(chips[min(chips)], size, size).transform  # the top-left chip's transform spans the mosaic
    inverse = ~corner
    fig, ax = plt.subplots(figsize=(6.4, 6.4 * mosaic.shape[0] / mosaic.shape[1]), dpi=100)
    ax.imshow(mosaic)
    ax.contour(truth, levels=[0.5], colors="cyan", linewidths=0.8)
    names = {p.name for p in chips.values()}
    with fiona.open(args.vectors) as layer:
        crs = CRS.from_wkt(layer.crs_wkt)
        for feature in layer:
            if feature.properties["source"] not in names:
                continue
            geometry = shape(feature.geometry)
            for ring in [geometry.exterior, *geometry.interiors]:
                xs, ys = np.asarray(ring.coords).T
                if crs.to_epsg() != 3857:
                    xs, ys = warp(crs, "EPSG:3857", xs, ys)
                cols, rows = inverse * (np.asarray(xs), np.asarray(ys))
                ax.add_patch(PathPatch(MplPath(np.column_stack([cols, rows])), facecolor=(1, 0.55, 0, 0.25),
                                       edgecolor=(1, 0.55, 0), linewidth=1.0))
    ax.set_xlim(-0.5, mosaic.shape[1] - 0.5)
    ax.set_ylim(mosaic.shape[0] - 0.5, -0.5)
    ax.set_axis_off()
    fig.subplots_adjust(0, 0, 1, 1)
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    Image.open(args.out).convert("RGB").quantize(128).save(args.out, optimize=True)  # small enough to commit


if __name__ == "__main__":
    main()
