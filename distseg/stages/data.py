"""A stage's data, opened once: the folders' manifests and class map, then the streams and the validation loader.

:meth:`StageData.check` reads every manifest a kind needs, once, and refuses bad folders before anything is built or
written; :meth:`StageData.open` then makes the loaders with the micro-batch DeepSpeed resolved. The loop draws from
``streams`` and validates on ``val_loader``; ``stage.json`` counts come from the same manifests.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distseg.data.classes import ClassMap
from distseg.data.manifest import read_manifest
from distseg.engine.distributed import DistEnv
from distseg.engine.loop import EpochStream
from distseg.stages.common import StageError


def labelled_manifest(shards: str) -> dict[str, Any]:
    """The manifest of a labelled shard folder, with errors that say how to make one."""
    if not shards:
        raise StageError("no training data given (data.shards / --data)")
    if not (Path(shards) / "manifest.json").is_file():
        raise StageError(f"{shards}: not a shard folder (no manifest.json); create it with `distseg shard-data`")
    manifest = read_manifest(shards)
    if manifest.get("class_map") is None:
        raise StageError(f"{shards}: holds unlabelled images only (no class map); this stage needs labelled shards")
    return manifest


def data_class_map(shards: str) -> ClassMap:
    """The class map of a labelled shard folder (see :func:`labelled_manifest` for its errors)."""
    return ClassMap.from_dict(labelled_manifest(shards)["class_map"], where=f"{shards}/manifest.json")


def pool_samples(folders: list[str], split: str) -> int:
    """The unlabelled pool's sample count; every folder must be a shard folder with ``split``."""
    total = 0
    for folder in folders:
        if not folder or not (Path(folder) / "manifest.json").is_file():
            raise StageError(f"{folder or '(none)'}: not a shard folder (no manifest.json); the unlabelled pool "
                             f"needs folders written by `distseg shard-data`")
        splits = read_manifest(folder)["splits"]
        if split not in splits:
            raise StageError(f"{folder}: no {split!r} split to use as the unlabelled pool (splits: {sorted(splits)})")
        total += splits[split]["samples"]
    return total


def make_loader(shards: str | list[str], split: str, stream_cfg, env: DistEnv, *, batch_size: int, train: bool,
                views: tuple[str, ...] = ("weak",), sample_fraction: float | None = None, seed: int = 0):
    """A per-rank loader of ``split`` with the micro-batch size DeepSpeed resolved."""
    from distseg.data.stream import build_loader

    changes: dict[str, Any] = {"batch_size": batch_size, "seed": seed}
    if sample_fraction is not None:
        changes["sample_fraction"] = sample_fraction
    cfg = dataclasses.replace(stream_cfg, **changes)
    return build_loader(shards, split, cfg, rank=env.rank, world_size=env.world_size, train=train, views=views)


@dataclass
class StageData:
    """What one stage reads (see module docstring)."""

    cfg: Any
    """The stage's ``DataConfig`` (``cfg.data``)."""
    labelled: bool
    """Whether the kind reads the labelled folder (its train split, and its val split when present)."""
    manifest: dict[str, Any] | None
    """The labelled folder's manifest (None for kinds that read no labels)."""
    class_map: ClassMap | None
    """The labelled data's classes (None for kinds that read no labels)."""
    pool: int
    """Samples in the whole unlabelled pool (0 for kinds that read none)."""
    views: tuple[str, ...] = ("weak",)
    """Views of each unlabelled tile the pool's loader produces (the kind's ``unlabelled_views``)."""
    streams: dict[str, EpochStream] = field(default_factory=dict)
    """The endless train streams, named like the fields of ``Batches`` (after :meth:`open`)."""
    val_loader: Any = None
    """Whole-tile validation loader (after :meth:`open`; None without labels or without a val split)."""

    @classmethod
    def check(cls, kind, cfg) -> "StageData":
        """Read and check the folders ``kind`` needs (each manifest once), before anything is built."""
        data = cfg.data
        manifest = labelled_manifest(data.shards) if kind.labelled else None
        class_map = ClassMap.from_dict(manifest["class_map"], where=f"{data.shards}/manifest.json") \
            if manifest else None
        pool = pool_samples(data.pool(kind.labelled), data.unlabeled_split) if kind.unlabelled else 0
        return cls(data, kind.labelled, manifest, class_map, pool, kind.unlabelled_views)

    def open(self, wanted: tuple[str, ...], env: DistEnv, *, micro: int, eval_batch: int, seed: int) -> None:
        """Make the ``wanted`` train streams (seeds differ per stream) and the validation loader."""
        data = self.cfg
        if "labelled" in wanted:
            self.streams["labelled"] = EpochStream(make_loader(data.shards, data.train_split, data.stream, env,
                                                               batch_size=micro, train=True, seed=seed))
        if "unlabelled" in wanted:
            ratio = data.unlabeled_ratio if self.labelled else 1
            self.streams["unlabelled"] = EpochStream(make_loader(
                data.pool(self.labelled), data.unlabeled_split, data.stream, env, batch_size=micro * ratio,
                train=True, views=self.views, sample_fraction=data.unlabeled_fraction, seed=seed + 1))
        if self.manifest is not None and data.val_split in self.manifest["splits"]:
            self.val_loader = make_loader(data.shards, data.val_split, data.stream, env, batch_size=eval_batch,
                                          train=False)

    def counts(self) -> dict[str, int]:
        """The labelled train samples and the unlabelled samples this run reads (for stage.json)."""
        labelled = self.manifest["splits"].get(self.cfg.train_split, {}) if self.manifest else {}
        unlabelled = round(self.pool * self.cfg.unlabeled_fraction) if "unlabelled" in self.streams else 0
        return {"labeled_samples": labelled.get("samples", 0), "unlabeled_samples": unlabelled}
