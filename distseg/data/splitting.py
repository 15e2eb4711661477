"""Deterministic train/val/test splits by source image or file-name group, and the labelled subset."""
from __future__ import annotations

import hashlib
import math
import re

from distseg.data.errors import DataError

SPLITS = ("train", "val", "test")


def stable_hash(*parts: object) -> int:
    """A process-independent 64-bit hash (Python's hash() is salted per process)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def parse_ratio(text: str) -> dict[str, float]:
    """'8:1:1' -> {'train': 0.8, 'val': 0.1, 'test': 0.1}; one to three non-negative parts."""
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        raise DataError(f"--split {text!r}: expected numbers like 8:1:1") from None
    if not 1 <= len(parts) <= 3 or any(p < 0 or not math.isfinite(p) for p in parts) or sum(parts) <= 0:
        raise DataError(f"--split {text!r}: expected 1-3 non-negative parts train:val:test with a positive sum")
    total = sum(parts)
    return {name: parts[i] / total if i < len(parts) else 0.0 for i, name in enumerate(SPLITS)}


def group_of(name: str, pattern: re.Pattern[str] | None) -> str:
    """The group a file belongs to: the regex match (its first group if it has one), else the file stem."""
    if pattern is None:
        return name.rsplit(".", 1)[0]
    match = pattern.search(name)
    if match is None:
        raise DataError(f"{name}: --group-by {pattern.pattern!r} does not match this file name")
    return match.group(1) if pattern.groups else match.group(0)


def split_counts(n: int, ratios: dict[str, float]) -> dict[str, int]:
    """Groups per split by largest remainder; each split with a positive ratio gets one if there are enough."""
    wanted = [name for name in SPLITS if ratios[name] > 0]
    counts = {name: int(n * ratios[name]) for name in SPLITS}
    order = sorted(wanted, key=lambda s: n * ratios[s] - counts[s], reverse=True)
    for name in order[: n - sum(counts.values())]:
        counts[name] += 1
    if n >= len(wanted):
        for name in wanted:
            while counts[name] == 0:
                donor = max(wanted, key=lambda s: counts[s])
                counts[donor] -= 1
                counts[name] += 1
    return counts


def assign_splits(groups: list[str], ratios: dict[str, float], seed: int) -> dict[str, str]:
    """Map each group to a split: groups ordered by a seeded hash, then cut by the split counts."""
    unique = sorted(set(groups), key=lambda g: (stable_hash(seed, "split", g), g))
    counts = split_counts(len(unique), ratios)
    out: dict[str, str] = {}
    start = 0
    for name in SPLITS:
        for g in unique[start:start + counts[name]]:
            out[g] = name
        start += counts[name]
    return out


def labeled_subset(keys: list[str], fraction: float, seed: int) -> set[str]:
    """The ``round(fraction * n)`` train keys (at least one) that keep their labels, chosen by seeded hash."""
    if fraction >= 1.0 or not keys:
        return set(keys)
    keep = max(1, round(fraction * len(keys)))
    return set(sorted(keys, key=lambda k: (stable_hash(seed, "labeled", k), k))[:keep])
