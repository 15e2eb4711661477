"""Class maps: class names, mask colours/values, and the encoding of raw masks into index masks.

A class map file (YAML or JSON) looks like::

    ignore_index: 255
    classes:
      - {name: building, index: 0, color: [60, 16, 152]}          # colour-coded RGB masks
      - {name: road, index: 1, value: 3}                          # single-channel / palette index masks
      - {name: unlabeled, color: [155, 155, 155], ignore: true}   # pixels mapped to ignore_index

Training classes get indices ``0..C-1`` (``index`` may be omitted: file order is used). Several
entries may share an index (two colours for one class) as long as they share its name.
"""
from __future__ import annotations

import colorsys
import dataclasses
from pathlib import Path
from typing import Any, Literal

import numpy as np

from distseg.data.errors import DataError

Unknown = Literal["error", "ignore"]


@dataclasses.dataclass(frozen=True)
class ClassEntry:
    """One line of a class map: a training class or an ignored colour/value."""

    name: str
    """Human-readable class name."""
    index: int | None
    """Training index 0..C-1, or None for ignored entries."""
    color: tuple[int, int, int] | None = None
    """RGB colour of this class in colour-coded masks."""
    value: int | None = None
    """Pixel value of this class in single-channel or palette index masks."""


def _palette(n: int) -> list[tuple[int, int, int]]:
    """A deterministic, well-separated colour palette (golden-ratio hues) for maps that gave no colours."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.95 - 0.25 * (i % 2))
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def _describe(code: int, rgb: bool) -> str:
    """A mask code as users know it: an RGB colour or a pixel value."""
    return f"colour ({code >> 16}, {(code >> 8) & 255}, {code & 255})" if rgb else f"value {code}"


def _parse_entry(raw: Any, pos: int, where: str) -> tuple[ClassEntry, bool]:
    """Validate one ``classes`` item; returns the entry and whether it is an ignored entry."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: classes[{pos}] must be a mapping, got {raw!r}")
    unknown = set(raw) - {"name", "index", "color", "value", "ignore"}
    if unknown:
        raise DataError(f"{where}: classes[{pos}] has unknown key(s) {sorted(unknown)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: classes[{pos}] needs a non-empty 'name'")
    color = raw.get("color")
    if color is not None:
        if (not isinstance(color, (list, tuple)) or len(color) != 3
                or not all(isinstance(c, int) and 0 <= c <= 255 for c in color)):
            raise DataError(f"{where}: class {name!r}: color must be [r, g, b] with ints 0..255, got {color!r}")
        color = tuple(color)
    value = raw.get("value")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535):
        raise DataError(f"{where}: class {name!r}: value must be an int 0..65535, got {value!r}")
    if color is None and value is None:
        raise DataError(f"{where}: class {name!r} needs a 'color' (RGB masks) or a 'value' (index masks)")
    ignore = raw.get("ignore", False)
    if not isinstance(ignore, bool):
        raise DataError(f"{where}: class {name!r}: ignore must be true/false, got {ignore!r}")
    index = raw.get("index")
    if ignore and index is not None:
        raise DataError(f"{where}: class {name!r} is ignored and must not have an index")
    if index is not None and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
        raise DataError(f"{where}: class {name!r}: index must be a non-negative int, got {index!r}")
    return ClassEntry(name, None if ignore else index, color, value), ignore


@dataclasses.dataclass(frozen=True, eq=False)
class ClassMap:
    """The classes of a dataset and how raw masks encode them.

    Equality compares what a model head depends on: training class names in index order and the
    ignore index (colours and mask values may differ between datasets of the same label space).
    """

    entries: tuple[ClassEntry, ...]
    """All entries, training classes and ignored colours/values."""
    ignore_index: int = 255
    """Index written for ignored pixels (padding, unlabelled colours)."""

    def __post_init__(self) -> None:
        if not 0 <= self.ignore_index <= 255:
            raise DataError(f"ignore_index must be in 0..255 (masks are uint8), got {self.ignore_index}")
        names: dict[int, str] = {}
        for e in self.entries:
            if e.index is not None and names.setdefault(e.index, e.name) != e.name:
                raise DataError(f"index {e.index} is used by two classes: {names[e.index]!r} and {e.name!r}")
        if sorted(names) != list(range(len(names))):
            raise DataError(f"class indices must be 0..{len(names) - 1} without gaps, got {sorted(names)}")
        if not names:
            raise DataError("a class map needs at least one training class")
        if self.ignore_index < len(names):
            raise DataError(f"ignore_index {self.ignore_index} collides with a class index (0..{len(names) - 1})")
        self._check_unique("color")
        self._check_unique("value")

    def _check_unique(self, attr: str) -> None:
        """Two entries with one colour (or value) would make encoding ambiguous."""
        seen: dict[Any, str] = {}
        for e in self.entries:
            key = getattr(e, attr)
            if key is not None and seen.setdefault(key, e.name) != e.name:
                raise DataError(f"{attr} {key} is given to both {seen[key]!r} and {e.name!r}")

    # ---- construction / serialisation -------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, where: str = "class map") -> ClassMap:
        """Build from the file format above; every problem raises DataError naming ``where``."""
        if not isinstance(data, dict):
            raise DataError(f"{where}: expected a mapping with 'classes', got {type(data).__name__}")
        unknown = set(data) - {"classes", "ignore_index"}
        if unknown:
            raise DataError(f"{where}: unknown key(s) {sorted(unknown)}; expected 'classes' and 'ignore_index'")
        raw = data.get("classes")
        if not isinstance(raw, list) or not raw:
            raise DataError(f"{where}: 'classes' must be a non-empty list")
        ignore_index = data.get("ignore_index", 255)
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise DataError(f"{where}: ignore_index must be an int, got {ignore_index!r}")
        parsed = [_parse_entry(item, i, where) for i, item in enumerate(raw)]
        explicit = {e.index is not None for e, ignored in parsed if not ignored}
        if explicit == {True, False}:
            raise DataError(f"{where}: give 'index' for every training class or for none")
        order: dict[str, int] = {}
        entries = []
        for e, ignored in parsed:
            if not ignored and e.index is None:  # no explicit indices: first appearance of a name
                e = dataclasses.replace(e, index=order.setdefault(e.name, len(order)))
            entries.append(e)
        try:
            return cls(tuple(entries), ignore_index)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> ClassMap:
        """Read a YAML or JSON class map file."""
        from distseg.config import ConfigError, read_mapping

        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: class map file not found")
        try:
            data = read_mapping(path)
        except ConfigError as exc:  # JSON/YAML syntax errors of any kind are one user-facing problem
            detail = str(exc).removeprefix(f"{path}: ").splitlines()[0]
            raise DataError(f"{path}: malformed class map: {detail}") from None
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_manifest(cls, shard_dir: str | Path) -> ClassMap:
        """The class map stored in a shard folder's manifest.json."""
        from distseg.data.manifest import read_manifest

        data = read_manifest(shard_dir).get("class_map")
        if data is None:
            raise DataError(f"{shard_dir}: the manifest has no class map (unlabelled-only shards)")
        return cls.from_dict(data, where=f"{shard_dir}/manifest.json")

    def to_dict(self) -> dict[str, Any]:
        """The file format above (round-trips through from_dict)."""
        classes = []
        for e in self.entries:
            item: dict[str, Any] = {"name": e.name}
            if e.index is None:
                item["ignore"] = True
            else:
                item["index"] = e.index
            if e.color is not None:
                item["color"] = list(e.color)
            if e.value is not None:
                item["value"] = e.value
            classes.append(item)
        return {"ignore_index": self.ignore_index, "classes": classes}

    # ---- views ----------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of training classes C (indices 0..C-1)."""
        return len({e.index for e in self.entries if e.index is not None})

    @property
    def names(self) -> list[str]:
        """Training class names by index."""
        by_index = {e.index: e.name for e in self.entries if e.index is not None}
        return [by_index[i] for i in range(self.num_classes)]

    @property
    def colors(self) -> list[tuple[int, int, int]]:
        """Display colour per training class: the file's colour, else a deterministic palette colour."""
        palette = _palette(self.num_classes)
        given: dict[int, tuple[int, int, int]] = {}
        for e in self.entries:
            if e.index is not None and e.color is not None:
                given.setdefault(e.index, e.color)
        return [given.get(i, palette[i]) for i in range(self.num_classes)]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClassMap):
            return NotImplemented
        return self.names == other.names and self.ignore_index == other.ignore_index

    __hash__ = None  # type: ignore[assignment]  # mutable-style equality; not used as a dict key

    # ---- encoding -------------------------------------------------------------------------------
    def encode(self, mask: np.ndarray, path_for_errors: str | Path = "<mask>",
               unknown: Unknown = "error") -> np.ndarray:
        """Raw mask (H×W values or H×W×3 RGB) -> uint8 H×W index mask with ignore_index for ignored pixels.

        Values absent from the map raise DataError naming the value, its pixel count and the file,
        unless ``unknown='ignore'`` maps them to ignore_index.
        """
        if mask.ndim == 3 and mask.shape[2] == 3:
            keys = {e.color: e for e in self.entries if e.color is not None}
            if not keys:
                raise DataError(f"{path_for_errors}: RGB mask but the class map gives no 'color' entries")
            codes = (mask[..., 0].astype(np.int64) << 16) | (mask[..., 1].astype(np.int64) << 8) | mask[..., 2]
            table = {(c[0] << 16) | (c[1] << 8) | c[2]: e for c, e in keys.items()}
        elif mask.ndim == 2:
            table = {e.value: e for e in self.entries if e.value is not None}
            if not table:
                raise DataError(f"{path_for_errors}: single-channel mask but the class map gives no 'value' entries")
            codes = mask.astype(np.int64)
        else:
            raise DataError(f"{path_for_errors}: mask must be H×W or H×W×3, got shape {mask.shape}")
        return self._lookup(codes, table, mask.ndim == 3, path_for_errors, unknown)

    def _lookup(self, codes: np.ndarray, table: dict[int, ClassEntry], rgb: bool,
                path: str | Path, unknown: Unknown) -> np.ndarray:
        """Map integer codes through ``table`` with a sorted search (fast for few classes, any code range)."""
        keys = np.array(sorted(table), dtype=np.int64)
        targets = np.array([self.ignore_index if table[k].index is None else table[k].index for k in keys],
                           dtype=np.uint8)
        pos = np.clip(np.searchsorted(keys, codes), 0, len(keys) - 1)
        known = keys[pos] == codes
        out = targets[pos]
        if not known.all():
            if unknown == "error":
                bad, counts = np.unique(codes[~known], return_counts=True)
                top = np.argsort(-counts)[:3]
                listed = ", ".join(f"{_describe(int(bad[i]), rgb)} ({int(counts[i])} px)" for i in top)
                more = f" and {len(bad) - len(top)} more" if len(bad) > len(top) else ""
                raise DataError(f"{path}: mask has {listed}{more} not in the class map "
                                f"(use --unknown ignore to map them to ignore)")
            out[~known] = self.ignore_index
        return out

    def decode_colors(self, index_mask: np.ndarray) -> np.ndarray:
        """uint8 index mask -> RGB visualisation (ignored pixels black)."""
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: self.num_classes] = np.array(self.colors, dtype=np.uint8)
        return lut[index_mask]

