"""Rolling tar writer for one split: shard size limits, per-shard sha256 and keys, class pixel counts."""
from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np

from distseg.data.errors import DataError

TAR_BLOCK = 512
"""Tar stores each member as a header block plus its data rounded up to whole blocks."""


@dataclasses.dataclass(frozen=True)
class ShardLimit:
    """When to start a new shard: after ``samples`` samples or before exceeding ``bytes`` bytes."""

    samples: int | None = None
    """Maximum samples per shard (None: no sample limit)."""
    bytes: int | None = None
    """Target maximum member bytes per shard (None: no size limit); a single larger sample still gets a
    shard, and tar's end-of-archive record padding (up to 10 KiB) comes on top."""


def parse_shard_size(text: str | int) -> ShardLimit:
    """'1000' -> 1000 samples; '64MB' / '512KB' / '1GB' -> a byte limit (decimal units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]B)?\s*", str(text), flags=re.IGNORECASE)
    if match is None or float(match.group(1)) <= 0 or (match.group(2) is None and "." in match.group(1)):
        raise DataError(f"--shard-size {text!r}: expected a sample count (1000) or a size (64MB)")
    if match.group(2) is None:
        return ShardLimit(samples=int(match.group(1)))
    scale = {"KB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2).upper()]
    return ShardLimit(bytes=int(float(match.group(1)) * scale))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class SplitWriter:
    """Writes one split as ``<split>-NNNNNN.tar`` shards and keeps the statistics for the manifest."""

    def __init__(self, out_dir: Path, split: str, limit: ShardLimit, num_classes: int) -> None:
        self.out_dir, self.split, self.limit = Path(out_dir), split, limit
        self.samples = 0
        self.sources: set[str] = set()
        self.class_pixels = np.zeros(num_classes, dtype=np.int64)
        self.ignore_pixels = 0
        self.shards: list[dict[str, Any]] = []
        self._tar: Any = None
        self._keys: list[str] = []
        self._bytes = 0

    def _open_next(self) -> None:
        """Close the current shard (if any) and start the next numbered one."""
        import webdataset as wds

        self._finish()
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._path = self.out_dir / name
        self._tar = wds.TarWriter(str(self._path), encoder=False, mtime=0)  # fixed int mtime: reproducible, no PAX
        self._keys, self._bytes = [], 0

    def _full(self, size: int) -> bool:
        """Whether adding a sample of ``size`` bytes would exceed the limit of the open shard."""
        if self._tar is None:
            return True
        if self.limit.samples is not None and len(self._keys) >= self.limit.samples:
            return True
        return self.limit.bytes is not None and bool(self._keys) and self._bytes + size > self.limit.bytes

    def write(self, sample: dict[str, Any], mask: np.ndarray | None, source: str) -> None:
        """Append one sample (``__key__`` + encoded fields) and count its mask pixels."""
        size = sum(TAR_BLOCK * (1 + -(-len(v) // TAR_BLOCK)) for k, v in sample.items() if not k.startswith("__"))
        if self._full(size):
            self._open_next()
        self._tar.write(sample)
        self._keys.append(sample["__key__"])
        self._bytes += size
        self.samples += 1
        self.sources.add(source)
        if mask is not None:
            counts = np.bincount(mask.ravel(), minlength=256)
            self.class_pixels += counts[: len(self.class_pixels)]
            self.ignore_pixels += int(counts.sum() - counts[: len(self.class_pixels)].sum())

    def _finish(self) -> None:
        """Close the open shard and record its name, sample count, size, sha256 and keys."""
        if self._tar is None:
            return
        self._tar.close()
        self.shards.append({"name": self._path.name, "split": self.split, "samples": len(self._keys),
                            "bytes": self._path.stat().st_size, "sha256": sha256_file(self._path),
                            "keys": self._keys})
        self._tar = None

    def close(self) -> None:
        """Finish the last shard."""
        self._finish()
