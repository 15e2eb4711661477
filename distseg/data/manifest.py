"""``manifest.json`` of a shard folder: reading, validating and printing it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distseg.data.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "distseg-shards/1"


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """Load and sanity-check ``shard_dir/manifest.json``."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no manifest (is {shard_dir} a folder written by `distseg shard-data`?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} manifest")
    for key in ("splits", "shards"):
        if key not in manifest:
            raise DataError(f"{path}: manifest lacks {key!r}")
    return manifest


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest (called last, inside the temporary folder)."""
    (Path(out_dir) / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def split_shards(manifest: dict[str, Any], split: str, where: str | Path = "") -> list[dict[str, Any]]:
    """The shard entries of one split, in file order; an unknown or empty split is an error."""
    shards = [s for s in manifest["shards"] if s["split"] == split]
    if not shards:
        known = sorted(manifest["splits"])
        raise DataError(f"{where}: split {split!r} has no samples (splits present: {known})")
    return shards


def _human(n: float) -> str:
    """Bytes as a short human string."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_manifest(manifest: dict[str, Any], console: Any = None) -> None:
    """Render the manifest as rich tables: splits, class pixel shares per split, shards."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.print(f"distseg {manifest.get('version', '?')} shards; command: {' '.join(manifest.get('command', []))}")
    splits = Table(title="splits")
    for col in ("split", "samples", "sources", "shards", "size"):
        splits.add_column(col, justify="left" if col == "split" else "right")
    for name, info in manifest["splits"].items():
        shards = [s for s in manifest["shards"] if s["split"] == name]
        splits.add_row(name, str(info["samples"]), str(info.get("sources", "")), str(len(shards)),
                       _human(sum(s["bytes"] for s in shards)))
    console.print(splits)
    labelled = {k: v for k, v in manifest["splits"].items() if v.get("class_pixels")}
    if labelled:
        classes = Table(title="class pixel share (%)")
        classes.add_column("class")
        for name in labelled:
            classes.add_column(name, justify="right")
        names = list(next(iter(labelled.values()))["class_pixels"]) + ["<ignore>"]
        for cls in names:
            row = []
            for info in labelled.values():
                total = sum(info["class_pixels"].values()) + info["ignore_pixels"]
                count = info["ignore_pixels"] if cls == "<ignore>" else info["class_pixels"][cls]
                row.append(f"{100 * count / max(total, 1):.2f}")
            classes.add_row(cls, *row)
        console.print(classes)
    shards = Table(title="shards")
    for col in ("file", "samples", "size", "sha256"):
        shards.add_column(col, justify="right" if col in ("samples", "size") else "left")
    for s in manifest["shards"]:
        shards.add_row(s["name"], str(s["samples"]), _human(s["bytes"]), s["sha256"][:16] + "…")
    console.print(shards)
