"""Per-class area summary of a prediction: pixel counts, shares and m² when georeferenced."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


class AreaCounter:
    """Counts predicted pixels per class block by block (the full mask is never held)."""

    def __init__(self) -> None:
        self.counts = np.zeros(256, dtype=np.int64)

    def add(self, labels: np.ndarray) -> None:
        """Add one uint8 label block."""
        self.counts += np.bincount(labels.ravel(), minlength=256)

    def summary(self, input_path: Path, height: int, width: int, names: list[str], ignore_index: int,
                pixel_area_m2: float | None) -> dict[str, Any]:
        """JSON-ready summary; fractions are of the valid (non-nodata) pixels."""
        valid = int(self.counts[: len(names)].sum())
        classes = []
        for index, name in enumerate(names):
            pixels = int(self.counts[index])
            classes.append({"index": index, "name": name, "pixels": pixels,
                            "fraction": pixels / valid if valid else 0.0,
                            "area_m2": pixels * pixel_area_m2 if pixel_area_m2 is not None else None})
        return {"input": str(input_path), "height": height, "width": width, "valid_pixels": valid,
                "nodata_pixels": int(self.counts[ignore_index]), "pixel_area_m2": pixel_area_m2, "classes": classes}


def write_summary(summary: dict[str, Any], path: Path) -> None:
    """Write the summary JSON atomically."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)


def combine(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary over several inputs (same classes): pixels and areas add up; area only if all have it."""
    first = summaries[0]
    georef = all(s["pixel_area_m2"] is not None for s in summaries)
    valid = sum(s["valid_pixels"] for s in summaries)
    classes = []
    for i, c in enumerate(first["classes"]):
        pixels = sum(s["classes"][i]["pixels"] for s in summaries)
        area = sum(s["classes"][i]["area_m2"] for s in summaries) if georef else None
        classes.append({**c, "pixels": pixels, "fraction": pixels / valid if valid else 0.0, "area_m2": area})
    return {"input": f"{len(summaries)} files", "height": None, "width": None, "valid_pixels": valid,
            "nodata_pixels": sum(s["nodata_pixels"] for s in summaries),
            "pixel_area_m2": first["pixel_area_m2"] if georef else None, "classes": classes}


def print_summary(summary: dict[str, Any]) -> None:
    """The summary as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    georef = summary["pixel_area_m2"] is not None
    size = f"{summary['width']}×{summary['height']} px, " if summary["width"] is not None else ""
    table = Table(title=f"{Path(summary['input']).name} ({size}{summary['nodata_pixels']:,} nodata px)")
    for column in ("class", "pixels", "share") + (("area m²",) if georef else ()):
        table.add_column(column, justify="left" if column == "class" else "right")
    for c in summary["classes"]:
        row = [c["name"], f"{c['pixels']:,}", f"{100 * c['fraction']:.1f} %"]
        if georef:
            row.append(f"{c['area_m2']:,.1f}")
        table.add_row(*row)
    Console().print(table)
