"""One ranking from many signals, and which signal drove it.

Every signal becomes a *gap* (0 = like the target, larger = further), divided by its largest value over the
candidates so that units cancel. Signals are grouped in families (features, low-level statistics, labels,
transferability); a family's score is the mean of its signals' normalised gaps and a candidate's score the mean
over the families it has (an unlabelled candidate has no label family), so no family counts more for having more
signals. Candidates are ranked by score, closest first.

*Which signal drove the ranking*: between two neighbouring rows the score difference is the sum of the families'
differences (over the number of families), so each step of the table has a family that contributed most to it;
over the whole table, the family whose positive contributions sum highest is reported, with its share.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Signal:
    """One measured quantity and how it becomes a gap."""

    name: str
    family: str
    label: str
    """Column header."""
    gap: Callable[[float, list[float]], float]
    """(value, every candidate's value) -> gap >= 0."""


def _distance(value: float, _: list[float]) -> float:
    return max(value, 0.0)


def _overlap(value: float, _: list[float]) -> float:
    return 1.0 - value


def _relative(value: float, values: list[float]) -> float:
    """For scores without a natural zero (LogME): the shortfall from the best candidate."""
    return max(values) - value


SIGNALS: tuple[Signal, ...] = (
    Signal("fd", "feature", "FD (rel.)", _distance),
    Signal("mmd", "feature", "MMD² (p)", _distance),
    Signal("color", "low-level", "colour EMD", _distance),
    Signal("texture", "low-level", "texture EMD", _distance),
    Signal("size", "low-level", "size |log2|", _distance),
    Signal("labels", "labels", "label overlap", _overlap),
    Signal("logme", "transfer", "LogME", _relative),
)
"""Every ranked signal, in table order."""
FAMILIES = tuple(dict.fromkeys(s.family for s in SIGNALS))


@dataclasses.dataclass
class Ranking:
    """Candidates closest first, with their scores and what separated them."""

    order: list[str]
    score: dict[str, float]
    family_score: dict[str, dict[str, float]]
    """candidate -> family -> mean normalised gap."""
    step_driver: dict[str, str | None]
    """candidate -> the family that most separated it from the row above (None for the first row)."""
    driver: str | None
    """The family that drove the ranking overall (None with a single candidate or all scores equal)."""
    driver_share: float | None
    """Its share of all positive family contributions between neighbouring rows."""


def _normalised(values: dict[str, dict[str, float | None]]) -> dict[str, dict[str, float]]:
    """candidate -> signal -> gap / largest gap of that signal (signals a candidate lacks are left out)."""
    out: dict[str, dict[str, float]] = {c: {} for c in values}
    for sig in SIGNALS:
        have = {c: v[sig.name] for c, v in values.items() if v.get(sig.name) is not None}
        gaps = {c: sig.gap(v, list(have.values())) for c, v in have.items()}
        top = max(gaps.values(), default=0.0)
        for c, g in gaps.items():
            out[c][sig.name] = g / top if top > 0 else 0.0
    return out


def _families(norm: dict[str, float]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for sig in SIGNALS:
        if sig.name in norm:
            groups.setdefault(sig.family, []).append(norm[sig.name])
    return {f: sum(v) / len(v) for f, v in groups.items()}


def rank(values: dict[str, dict[str, float | None]]) -> Ranking:
    """Rank candidates from their raw signal values (``values[candidate][signal]``, None = not measured)."""
    norm = _normalised(values)
    fam = {c: _families(n) for c, n in norm.items()}
    score = {c: (sum(f.values()) / len(f) if f else math.inf) for c, f in fam.items()}
    order = sorted(values, key=lambda c: (score[c], values[c].get("fd") or 0.0, c))
    steps: dict[str, str | None] = {order[0]: None} if order else {}
    positive = {f: 0.0 for f in FAMILIES}
    for above, below in zip(order, order[1:]):
        common = [f for f in fam[below] if f in fam[above]]
        delta = {f: fam[below][f] - fam[above][f] for f in common}
        steps[below] = max(delta, key=delta.get) if delta and max(delta.values()) > 0 else None
        for f, d in delta.items():
            positive[f] += max(d, 0.0)
    total = sum(positive.values())
    driver = max(positive, key=positive.get) if total > 0 else None
    return Ranking(order, score, fam, steps, driver, positive[driver] / total if driver else None)
