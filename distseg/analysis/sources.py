"""The datasets a domain-gap analysis compares: shard folders, the splits read, and a seeded sample of tiles.

A dataset is named on the command line as ``FOLDER`` or ``FOLDER@SPLIT[,SPLIT]`` (``shards/dubai@val,test`` reads
another scene group of the same shards). Up to ``max_tiles`` tiles are drawn by a hash of (seed, key), so the sample
does not depend on how the data was sharded, and read shard by shard with the loader's own tar reader. Each tile
comes back cropped to its *valid* region: edge tiles of ``shard-data --tile`` are padded with zeros, and that
padding would otherwise count as black pixels in every statistic.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from distseg.data.errors import DataError
from distseg.data.manifest import read_manifest
from distseg.data.plan import SampleRef
from distseg.data.splitting import stable_hash

SPLITS = ("train", "val", "test", "unlabeled")


@dataclasses.dataclass(frozen=True)
class Tile:
    """One sampled tile: its key, the valid region of the image (uint8 H×W×3), and its mask if labelled."""

    key: str
    image: np.ndarray
    mask: np.ndarray | None


@dataclasses.dataclass
class Dataset:
    """A shard folder restricted to some splits, with the seeded tile sample drawn from them."""

    folder: Path
    splits: tuple[str, ...]
    """The splits read (those of the requested ones that hold samples)."""
    name: str
    """Display name (the folder name, plus ``@splits`` when they were given explicitly)."""
    manifest: dict[str, Any]
    available: int
    """Tiles in the splits read."""
    sample: list[tuple[Path, list[SampleRef]]]
    """The drawn tiles, grouped by shard file and sorted by position (the order they are read in)."""

    @property
    def sampled(self) -> int:
        return sum(len(refs) for _, refs in self.sample)


def parse_spec(text: str, default_splits: tuple[str, ...]) -> tuple[Path, tuple[str, ...], bool]:
    """``FOLDER`` or ``FOLDER@split,split`` -> (folder, splits, whether splits were explicit)."""
    head, sep, tail = text.rpartition("@")
    if sep and tail and all(part in SPLITS for part in tail.split(",")):
        return Path(head), tuple(tail.split(",")), True
    return Path(text), default_splits, False


def parse_splits(text: str) -> tuple[str, ...]:
    """A comma-separated split list, each one of :data:`SPLITS`."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in SPLITS]
    if not parts or bad:
        raise DataError(f"--split {text!r}: use a comma-separated list of {', '.join(SPLITS)}")
    return parts


def select(shard_keys: list[list[str]], max_tiles: int, seed: int) -> list[tuple[int, list[SampleRef]]]:
    """The ``max_tiles`` keys with the smallest hash of (seed, key), grouped by shard and sorted by position."""
    refs = [SampleRef(s, p, k) for s, keys in enumerate(shard_keys) for p, k in enumerate(keys)]
    refs.sort(key=lambda r: stable_hash("domain-gap", seed, r.key))
    by_shard: dict[int, list[SampleRef]] = {}
    for ref in refs[:max_tiles]:
        by_shard.setdefault(ref.shard, []).append(ref)
    return [(s, sorted(rs, key=lambda r: r.pos)) for s, rs in sorted(by_shard.items())]


def open_dataset(text: str, default_splits: tuple[str, ...], max_tiles: int, seed: int) -> Dataset:
    """Read a folder's manifest and draw its tile sample; a missing manifest or no tiles in the splits is an error."""
    folder, wanted, explicit = parse_spec(text, default_splits)
    manifest = read_manifest(folder)
    splits = tuple(s for s in wanted if manifest["splits"].get(s, {}).get("samples", 0) > 0)
    if not splits:
        present = sorted(s for s, info in manifest["splits"].items() if info.get("samples", 0) > 0)
        raise DataError(f"{folder}: no tiles in split {','.join(wanted)} (splits with tiles: {present})")
    shards = [s for s in manifest["shards"] if s["split"] in splits]
    chosen = select([s["keys"] for s in shards], max_tiles, seed)
    name = folder.resolve().name + (f"@{','.join(splits)}" if explicit else "")
    return Dataset(folder, splits, name, manifest, sum(len(s["keys"]) for s in shards),
                   [(folder / shards[i]["name"], refs) for i, refs in chosen])


def valid_region(meta: dict[str, Any], height: int, width: int) -> tuple[int, int]:
    """(h, w) of the tile that lies inside its source image; the rest is ``shard-data``'s edge padding."""
    if not {"offset", "original_size"} <= set(meta):
        return height, width
    (x, y), (full_w, full_h) = meta["offset"], meta["original_size"]
    return max(1, min(height, full_h - y)), max(1, min(width, full_w - x))


def read_tiles(ds: Dataset, masks: bool = False, whole: bool = False) -> Iterator[Tile]:
    """The sampled tiles in read order, cropped to their valid region unless ``whole`` (masks only when asked).

    ``whole`` keeps the padded tile as training saw it; its mask marks the padding as ignored anyway.
    """
    from distseg.data.stream import decode, read_samples

    for path, refs in ds.sample:
        for ref, fields in read_samples(path, refs):
            if isinstance(fields, Exception):
                raise DataError(f"{path}: cannot read sample {ref.key!r}: {fields}")
            try:
                image, mask = decode(fields, ref.key)
                meta = json.loads(fields["json"]) if "json" in fields and not whole else {}
            except (DataError, ValueError, OSError) as exc:
                raise DataError(f"{path}: corrupt sample {ref.key!r}: {exc}") from None
            pixels = np.asarray(image)
            h, w = valid_region(meta, *pixels.shape[:2])
            crop = np.asarray(mask)[:h, :w] if masks and mask is not None else None
            yield Tile(ref.key, pixels[:h, :w], crop)
