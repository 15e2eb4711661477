"""Label-space overlap from two shard folders' class maps, matched by name through a declared synonym table.

Names are compared after normalisation (lower case, spaces and hyphens as underscores) and after mapping through
:data:`SYNONYMS` (canonical name -> the names it absorbs), so ``trees`` and ``vegetation`` count as one class
while ``road`` and ``building`` stay apart. The table is declared here, not guessed; a YAML/JSON file of the same
shape (``canonical: [synonym, ...]``) replaces it. The overlap is the histogram intersection of the two datasets'
labelled-pixel shares per canonical class (from the manifests, no pixels read): 1 when both label the same classes
in the same proportions, 0 when they share no class.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from distseg.analysis import GapError

SYNONYMS: dict[str, tuple[str, ...]] = {
    "building": ("buildings", "roof", "roofs", "house", "built_up", "urban_building"),
    "road": ("roads", "street", "streets", "pavement", "paved", "impervious_surface", "impervious_surfaces",
             "highway"),
    "water": ("river", "lake", "sea", "pond", "waterbody", "water_body"),
    "vegetation": ("grassland", "grass", "low_vegetation", "forest", "tree", "trees", "shrub", "woodland"),
    "farmland": ("agriculture", "agricultural", "cropland", "crop", "field", "farm", "arable_land"),
    "bare_land": ("land", "bare_soil", "barren", "bare", "soil", "unpaved", "sand", "desert"),
    "background": ("clutter", "other", "others", "misc"),
}
"""Canonical class -> synonyms. Land-cover sets differ in granularity (grassland and forest vs vegetation); the
table merges such classes into the coarser one, which is what a head replacement between the two datasets can
still transfer."""


def normalise(name: str) -> str:
    """Lower case with runs of spaces, hyphens and underscores as one underscore."""
    return re.sub(r"[\s\-_]+", "_", name.strip().lower())


def canonical_lookup(table: dict[str, Any]) -> dict[str, str]:
    """name -> canonical name for every canonical name and synonym of ``table``; a synonym listed twice is an error."""
    lookup: dict[str, str] = {}
    for canon, synonyms in table.items():
        if isinstance(synonyms, str) or not all(isinstance(s, str) for s in synonyms):
            raise GapError(f"synonym table: {canon!r} must map to a list of names, got {synonyms!r}")
        for name in (canon, *synonyms):
            key = normalise(name)
            if lookup.get(key, normalise(canon)) != normalise(canon):
                raise GapError(f"synonym table: {name!r} is listed under both {lookup[key]!r} and {canon!r}")
            lookup[key] = normalise(canon)
    return lookup


def load_synonyms(path: str | Path | None) -> dict[str, str]:
    """The lookup of the table in ``path`` (YAML/JSON mapping), or of :data:`SYNONYMS`."""
    if path is None:
        return canonical_lookup(SYNONYMS)
    from distseg.config import read_mapping

    return canonical_lookup(read_mapping(path))


def class_shares(manifest: dict[str, Any], splits: tuple[str, ...]) -> dict[str, int] | None:
    """Labelled pixels per class name from the manifest: the given splits' counts, else every labelled split's.

    None when the folder carries no labels (unlabelled-only shards).
    """
    labelled = {s: info["class_pixels"] for s, info in manifest["splits"].items() if info.get("class_pixels")}
    if not labelled:
        return None
    use = [s for s in splits if s in labelled] or list(labelled)
    totals: dict[str, int] = {}
    for split in use:
        for name, count in labelled[split].items():
            totals[name] = totals.get(name, 0) + int(count)
    return totals


@dataclasses.dataclass(frozen=True)
class LabelOverlap:
    """How the candidate's label space covers the target's."""

    overlap: float
    """Histogram intersection of canonical labelled-pixel shares, in [0, 1]."""
    shared: tuple[str, ...]
    """Canonical classes both label."""
    target_only: tuple[str, ...]
    candidate_only: tuple[str, ...]


def _canonical_shares(pixels: dict[str, int], lookup: dict[str, str]) -> dict[str, float]:
    total = max(sum(pixels.values()), 1)
    shares: dict[str, float] = {}
    for name, count in pixels.items():
        canon = lookup.get(normalise(name), normalise(name))
        shares[canon] = shares.get(canon, 0.0) + count / total
    return shares


def label_overlap(target: dict[str, int], candidate: dict[str, int], lookup: dict[str, str]) -> LabelOverlap:
    """Compare two class-pixel tables (name -> pixels) through the synonym lookup."""
    t, c = _canonical_shares(target, lookup), _canonical_shares(candidate, lookup)
    overlap = sum(min(share, c.get(name, 0.0)) for name, share in t.items())
    present_t = {k for k, v in t.items() if v > 0}
    present_c = {k for k, v in c.items() if v > 0}
    return LabelOverlap(float(overlap), tuple(sorted(present_t & present_c)), tuple(sorted(present_t - present_c)),
                        tuple(sorted(present_c - present_t)))
