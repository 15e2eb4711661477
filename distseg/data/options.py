"""The options of ``distseg shard-data``, defined once.

:class:`ShardOptions` is the one definition: ``distseg shard-data`` builds its command-line options from these
fields, :func:`distseg.data.shard.shard_dataset` takes them as keywords, a recipe's ``shard:`` block is read into
this class, and the manifest records its layout fields (what decides whether existing shards are current).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distseg.data.errors import DataError
from distseg.limits import MAX_PIXELS


def _opt(default: Any, help: str, *, layout: bool = True) -> Any:
    """A field with its command-line help; ``layout`` fields shape the shards and are saved in the manifest."""
    return field(default=default, metadata={"help": help, "layout": layout})


@dataclass
class ShardOptions:
    """What to shard and how: input folders, tiling, splits, the labelled subset and the shard size."""

    images: str | None = _opt(None, "Folder of images (jpg/png/tif).", layout=False)
    masks: str | None = _opt(None, "Folder of masks paired with --images by file stem. Without it every image of "
                                   "--images is unlabelled.", layout=False)
    unlabeled: str | None = _opt(None, "Extra folder of unlabelled images.", layout=False)
    classes: str | None = _opt(None, "Class map (YAML or JSON); required with --masks.", layout=False)
    tile: int | None = _opt(None, "Cut images into TILE x TILE crops (edges padded).")
    overlap: int = _opt(0, "Overlap in pixels between neighbouring tiles.")
    split: str = _opt("8:1:1", "train:val:test ratio over source images or groups (those not pinned by --assign).")
    labeled_fraction: float = _opt(1.0, "Fraction of train tiles that keep labels; the rest go to 'unlabeled'.")
    group_by: str | None = _opt(None, "Regex on the file name; files with the same match (first group if any) stay "
                                      "in one split.")
    assign: str | None = _opt(None, "Pin groups to splits, e.g. 'val=tile2,test=tile8' (official splits); the "
                                    "other groups are split by --split.")
    strip_by: str | None = _opt(None, "Split along a map axis instead of by seeded hash: a regex on the file name "
                                      "with a named group x (the web-map tile column) and optionally z (its zoom). "
                                      "Files are ordered west to east by ground position and cut into train, val, "
                                      "test by --split over files; files whose extents overlap stay together.")
    include: str | None = _opt(None, "Regex on file names: use only the images, masks and unlabelled images whose "
                                     "name matches (e.g. '^nairobi_' to take one site from a folder of several).")
    seed: int = _opt(0, "Seed of the split, the labelled subset and the in-shard sample order.")
    shard_size: str | int = _opt("1000", "Target shard size: a sample count (1000) or a size (64MB).")
    unknown: str = _opt("error", "Mask values not in the class map: 'error' or 'ignore'.")
    max_pixels: int = _opt(MAX_PIXELS, "Refuse images whose header claims more pixels than this (a decompression "
                                       "bomb); raise it for real rasters that large.", layout=False)

    def __post_init__(self) -> None:
        for name in ("images", "masks", "unlabeled", "classes"):
            value = getattr(self, name)
            setattr(self, name, str(value) if isinstance(value, Path) else value)
        self.shard_size = str(self.shard_size)
        if self.tile is not None and self.tile <= 0:
            raise DataError(f"--tile {self.tile}: must be a positive pixel count")
        if self.overlap < 0 or (self.tile is not None and self.overlap >= self.tile):
            raise DataError(f"--overlap {self.overlap}: must be >= 0 and smaller than --tile")
        if not 0 < self.labeled_fraction <= 1:
            raise DataError(f"--labeled-fraction {self.labeled_fraction}: must be in (0, 1]")
        if self.max_pixels < 1:
            raise DataError(f"--max-pixels {self.max_pixels}: must be a positive pixel count")
        if self.unknown not in ("error", "ignore"):
            raise DataError(f"--unknown {self.unknown!r}: must be 'error' or 'ignore'")
        if self.masks is not None and self.images is None:
            raise DataError(f"{self.masks}: --masks needs --images")
        if self.masks is not None and self.classes is None:
            raise DataError(f"{self.masks}: labelled data needs a class map (--classes FILE)")
        self.pattern()
        self.include_pattern()
        strips = self.strip_pattern()
        if strips is not None and (self.group_by or self.assign):
            raise DataError(f"--strip-by {self.strip_by!r}: cannot be combined with --group-by or --assign (a strip "
                            "split decides the groups itself)")

    def _compile(self, name: str) -> re.Pattern[str] | None:
        """The compiled regex of option ``name`` (None when unset); a bad one is a DataError naming the flag."""
        value = getattr(self, name)
        try:
            return re.compile(value) if value else None
        except re.error as exc:
            raise DataError(f"{self.flag(name)} {value!r}: invalid regex ({exc})") from None

    def pattern(self) -> re.Pattern[str] | None:
        """The compiled ``group_by`` regex (None without one)."""
        return self._compile("group_by")

    def include_pattern(self) -> re.Pattern[str] | None:
        """The compiled ``include`` regex (None: every file)."""
        return self._compile("include")

    def strip_pattern(self) -> re.Pattern[str] | None:
        """The compiled ``strip_by`` regex (None: hash split); it must name a group ``x``."""
        pattern = self._compile("strip_by")
        if pattern is not None and "x" not in pattern.groupindex:
            raise DataError(f"--strip-by {self.strip_by!r}: needs a named group (?P<x>...) holding the tile column")
        return pattern

    def layout(self) -> dict[str, Any]:
        """The fields that shape the shards, as the manifest records them under ``options``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["layout"]}

    @staticmethod
    def flag(name: str) -> str:
        """The command-line spelling of a field (``labeled_fraction`` -> ``--labeled-fraction``)."""
        return "--" + name.replace("_", "-")

    def command(self, out: str | Path) -> list[str]:
        """The canonical ``distseg shard-data`` command (every option spelled out) that repeats this run."""
        args = ["distseg", "shard-data", str(out)]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                args += [self.flag(f.name), str(value)]
        return args
