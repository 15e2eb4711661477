"""Cleaning traced outlines in pixel space: simplification, hole filling, right-angle regularisation.

Traced regions follow pixel edges, so a slanted roof edge becomes a staircase. Douglas-Peucker
simplification (``shapely.simplify``) removes the stairs; for buildings, :func:`regularize` also squares the
corners. Its method, *dominant-orientation rectilinear snapping*:

1. simplify the outline with a tolerance of at least one pixel, so the stairs do not dominate the edge angles;
2. find the building's main direction: the length-weighted circular mean of the edge angles modulo 90°
   (angles are multiplied by 4 so that edges at 0°, 90°, 180° and 270° all vote for the same direction);
3. rotate the outline so that this direction is the x axis, label every edge horizontal or vertical by its
   slope, and merge consecutive edges of the same label into one wall;
4. place each horizontal wall at the length-weighted mean y of its edges, each vertical wall at their mean x,
   and make each corner the crossing of two consecutive walls; rotate back.

The result has only right angles. When a ring has fewer than four walls or the squared outline is not a valid
polygon, the simplified outline is kept instead.
"""
from __future__ import annotations

import math

import numpy as np


def dominant_angle(coords: np.ndarray) -> float:
    """Main direction of a closed ring's edges, in radians in [-π/4, π/4): edges longer count more."""
    edges = np.diff(coords, axis=0)
    lengths = np.hypot(edges[:, 0], edges[:, 1])
    angles = np.arctan2(edges[:, 1], edges[:, 0])
    return float(math.atan2((lengths * np.sin(4 * angles)).sum(), (lengths * np.cos(4 * angles)).sum()) / 4)


def _rectilinear(coords: np.ndarray) -> np.ndarray | None:
    """Snap an (almost) axis-aligned closed ring to horizontal and vertical walls; None with < 4 walls."""
    edges = np.diff(coords, axis=0)
    lengths = np.hypot(edges[:, 0], edges[:, 1])
    keep = lengths > 0
    starts, edges, lengths = coords[:-1][keep], edges[keep], lengths[keep]
    horizontal = np.abs(edges[:, 0]) >= np.abs(edges[:, 1])
    mids = starts + edges / 2
    walls: list[list[float]] = []  # [is_horizontal, weighted coordinate sum, length]
    for is_h, mid, length in zip(horizontal, mids, lengths):
        value = mid[1] if is_h else mid[0]
        if walls and walls[-1][0] == is_h:
            walls[-1][1] += value * length
            walls[-1][2] += length
        else:
            walls.append([is_h, value * length, length])
    if len(walls) > 1 and walls[0][0] == walls[-1][0]:
        last = walls.pop()
        walls[0][1] += last[1]
        walls[0][2] += last[2]
    if len(walls) < 4:
        return None
    places = [(bool(h), total / length) for h, total, length in walls]
    corners = []
    for (h1, v1), (_, v2) in zip(places, places[1:] + places[:1]):
        corners.append((v2, v1) if h1 else (v1, v2))
    return np.asarray(corners + corners[:1])


def regularize(polygon, tolerance: float):
    """``polygon`` (pixel coordinates) with right-angle corners; see the module docstring for the method."""
    import shapely
    from shapely import affinity
    from shapely.geometry import Polygon

    simple = shapely.simplify(polygon, max(tolerance, 1.0), preserve_topology=True)
    if simple.is_empty or simple.geom_type != "Polygon":
        return simple
    centre = simple.centroid
    angle = dominant_angle(np.asarray(simple.exterior.coords))
    upright = affinity.rotate(simple, -angle, origin=centre, use_radians=True)
    exterior = _rectilinear(np.asarray(upright.exterior.coords))
    if exterior is None:
        return simple
    holes = [ring for ring in (_rectilinear(np.asarray(r.coords)) for r in upright.interiors) if ring is not None]
    squared = Polygon(exterior, holes)
    if not squared.is_valid or squared.area <= 0:
        return simple
    return affinity.rotate(squared, angle, origin=centre, use_radians=True)


def clean(polygon, tolerance: float, fill_holes: bool, square: bool):
    """Fill holes, then regularise (``square``) or simplify with ``tolerance`` pixels (0: keep pixel edges)."""
    import shapely
    from shapely.geometry import Polygon

    if fill_holes:
        polygon = shapely.union_all([Polygon(p.exterior) for p in shapely.get_parts(polygon)])
    if square:
        polygon = shapely.union_all([regularize(p, tolerance) for p in shapely.get_parts(polygon)])
    elif tolerance > 0:
        polygon = shapely.simplify(polygon, tolerance, preserve_topology=True)
    if not polygon.is_valid:
        polygon = shapely.make_valid(polygon)
    return polygon
