"""Deterministic train/val/test splits by source image, file-name group or spatial strip, and the labelled subset."""
from __future__ import annotations

import hashlib
import math
import re
from fractions import Fraction

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


def parse_assign(text: str | None) -> dict[str, str]:
    """'val=tile2,test=tile8,test=tile9' -> {'tile2': 'val', 'tile8': 'test', 'tile9': 'test'} (group -> split).

    Official splits (LoveDA, Potsdam, Cityscapes) pin named groups to a split; a group may be pinned once.
    """
    pinned: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        split, sep, group = item.partition("=")
        split, group = split.strip(), group.strip()
        if not sep or split not in SPLITS or not group:
            raise DataError(f"--assign {text!r}: expected SPLIT=GROUP pairs separated by commas, SPLIT one of "
                            f"{list(SPLITS)} (got {item!r})")
        if pinned.setdefault(group, split) != split:
            raise DataError(f"--assign {text!r}: group {group!r} is pinned to both {pinned[group]} and {split}")
    return pinned


def assign_splits(groups: list[str], ratios: dict[str, float], seed: int,
                  pinned: dict[str, str] | None = None) -> dict[str, str]:
    """Map each group to a split: ``pinned`` groups to their split, the others ordered by a seeded hash and cut
    by the split counts."""
    pinned = pinned or {}
    unknown = sorted(set(pinned) - set(groups))
    if unknown:
        raise DataError(f"--assign names group(s) {unknown} that no labelled file belongs to; groups: "
                        f"{sorted(set(groups))[:20]}")
    unique = sorted(set(groups) - set(pinned), key=lambda g: (stable_hash(seed, "split", g), g))
    counts = split_counts(len(unique), ratios)
    out: dict[str, str] = dict(pinned)
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


def strip_extent(name: str, pattern: re.Pattern[str]) -> tuple[Fraction, Fraction]:
    """The ground x-extent [x, x + 1) / 2**z of a web-map tile named ``name`` (``z`` 0 without a ``z`` group).

    Dividing by 2**z puts tiles of different zoom levels on one axis, so a coarse tile and the finer tiles it
    covers are seen to overlap. Fractions keep the comparison exact.
    """
    match = pattern.search(name)
    if match is None:
        raise DataError(f"{name}: --strip-by {pattern.pattern!r} does not match this file name")
    zoom = int(match["z"]) if "z" in pattern.groupindex else 0
    x = int(match["x"])
    return Fraction(x, 2 ** zoom), Fraction(x + 1, 2 ** zoom)


def _strips(extents: dict[str, tuple[Fraction, Fraction]]) -> list[list[str]]:
    """Names grouped into strips, west to east: runs of extents that overlap (touching is not overlapping)."""
    strips: list[list[str]] = []
    east = None
    for name in sorted(extents, key=lambda n: (extents[n][0], n)):
        lo, hi = extents[name]
        if east is None or lo >= east:
            strips.append([])
            east = hi
        strips[-1].append(name)
        east = max(east, hi)
    return strips


def _nearest(bounds: list[int], target: int, lo: int, hi: int) -> int:
    """The index in [lo, hi] whose cumulative count ``bounds[i]`` is closest to ``target`` (the earlier on ties)."""
    return min(range(lo, hi + 1), key=lambda i: (abs(bounds[i] - target), i))


def strip_splits(extents: dict[str, tuple[Fraction, Fraction]], ratios: dict[str, float]) -> dict[str, str]:
    """Split files into west-to-east strips: train westmost, then val, then test, cut by ``ratios`` over files.

    Files whose x-extents overlap form one strip and are never separated, so no chip of one split shares ground
    with a chip of another along x. Each cut falls on the strip boundary nearest to its file count; every split
    with a positive ratio gets at least one strip, and too few strips for that is an error.
    """
    strips = _strips(extents)
    wanted = [name for name in SPLITS if ratios[name] > 0]
    if len(strips) < len(wanted):
        raise DataError(f"--strip-by: the {len(extents)} files form {len(strips)} separate strip(s), too few for "
                        f"the {len(wanted)} splits {wanted} of --split")
    counts = split_counts(len(extents), ratios)
    bounds = [0]
    for strip in strips:
        bounds.append(bounds[-1] + len(strip))
    k, has_val, has_test = len(strips), ratios["val"] > 0, ratios["test"] > 0
    if ratios["train"] <= 0:
        cut1 = 0
    elif not (has_val or has_test):
        cut1 = k
    else:
        cut1 = _nearest(bounds, counts["train"], 1, k - has_val - has_test)
    if not has_test:
        cut2 = k
    elif not has_val:
        cut2 = cut1
    else:
        cut2 = _nearest(bounds, counts["train"] + counts["val"], cut1 + 1, k - 1)
    out = {}
    for i, strip in enumerate(strips):
        split = "train" if i < cut1 else "val" if i < cut2 else "test"
        out.update(dict.fromkeys(strip, split))
    return out
