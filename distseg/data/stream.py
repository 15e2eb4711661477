"""Streaming batches from WebDataset shards: rank/worker split, shuffle buffer, decode, augment, batch.

``build_loader(shard_dir, split, cfg, rank=, world_size=)`` plans each epoch from the manifest
(see :mod:`distseg.data.plan`), so in train mode every rank yields exactly ``len(loader)`` batches
and no sample is read twice within an epoch except the few padding samples that fill the last
batches. Images come out as float32 B×3×H×W in [0, 1] (the model normalises), masks as int64 B×H×W.
"""
from __future__ import annotations

import dataclasses
import math
import multiprocessing
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distseg.data import tario
from distseg.data.augment import (AugmentConfig, apply_cutmix, brightness_factors, cutmix_boxes, strong_photometric,
                                  to_float, weak_geometric)
from distseg.data.batch import Batch
from distseg.data.errors import DataError
from distseg.data.imageio import open_image, open_mask
from distseg.data.manifest import read_manifest, split_shards
from distseg.data.plan import SampleRef, SlotPlan, plan_epoch, select_samples

IMAGE_FIELDS = ("jpg", "png", "jpeg")
MASK_FIELD = "mask.png"


@dataclasses.dataclass
class StreamConfig:
    """How a split is streamed: batching, workers, shuffling, augmentation and error tolerance."""

    batch_size: int = 8
    """Samples per batch on each rank."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: read in the main process)."""
    shuffle_buffer: int = 256
    """Samples held in each worker's shuffle buffer (train mode); shards are also shuffled per epoch."""
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    """Weak and strong augmentation settings (train mode only)."""
    max_error_rate: float = 0.01
    """Fail the epoch once more than this fraction of a rank's planned samples were corrupt (skipped)."""
    seed: int = 0
    """Seed of shard order, shuffle buffers, augmentation and ``sample_fraction``."""
    sample_fraction: float = 1.0
    """Use only this fraction of the split: samples whose hash of (key, seed) falls below it (nested)."""
    pin_memory: bool = False
    """Pin batches in page-locked memory for faster host-to-GPU copies."""

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be in [0, 1], got {self.max_error_rate}")
        if not 0.0 < self.sample_fraction <= 1.0:
            raise ValueError(f"sample_fraction must be in (0, 1], got {self.sample_fraction}")


def read_samples(path: Path, refs: list[SampleRef]) -> Iterator[tuple[SampleRef, dict[str, bytes] | Exception]]:
    """Yield the wanted samples of one tar (``refs`` sorted by position), seeking over the others.

    A read error (missing or truncated shard) is yielded as the exception for every wanted sample
    not read yet, so the caller counts them as corrupt instead of crashing.
    """
    wanted = {r.pos: r for r in refs}
    last = max(wanted)
    done: set[int] = set()
    try:
        with open(path, "rb") as f:
            tar = tario.TarStream(f, path)
            pos, key, fields = -1, None, {}
            for name in tar:
                mkey, _, field = name.rsplit("/", 1)[-1].partition(".")
                if mkey != key:
                    if pos in wanted:
                        yield wanted[pos], fields
                        done.add(pos)
                    pos, key, fields = pos + 1, mkey, {}
                    if pos > last:
                        break
                    if pos in wanted and mkey != wanted[pos].key:
                        raise DataError(f"{path}: sample {pos} is {mkey!r}, manifest says {wanted[pos].key!r}")
                if pos in wanted:
                    fields[field] = tar.read()
            else:
                if pos in wanted:
                    yield wanted[pos], fields
                    done.add(pos)
    except OSError as exc:
        for pos, ref in wanted.items():
            if pos not in done:
                yield ref, exc
        return
    for pos, ref in wanted.items():
        if pos not in done:
            yield ref, DataError(f"{path}: sample {ref.key!r} missing (shard shorter than its manifest)")


def shuffled(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Reservoir-style shuffle buffer: fill to ``size``, then emit a random element per new one."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(rng.integers(len(buf)))
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


def decode(fields: dict[str, bytes], key: str) -> tuple[Image.Image, Image.Image | None]:
    """Decoded RGB image and index mask (None for unlabelled samples) of one raw sample."""
    data = next((fields[f] for f in IMAGE_FIELDS if f in fields), None)
    if data is None:
        raise DataError(f"sample {key!r} has no image field (found {sorted(fields)})")
    image = open_image(data)
    mask = open_mask(fields[MASK_FIELD]) if MASK_FIELD in fields else None
    if mask is not None and mask.size != image.size:
        raise DataError(f"sample {key!r}: mask {mask.size} and image {image.size} differ")
    return image, mask


def _alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor; inside a loader worker it lives in shared memory already, so the DataLoader
    hands it to the main process without another copy (what torch's default_collate does too)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    return proto.new(proto._typed_storage()._new_shared(math.prod(shape))).view(shape)


class ShardStream(IterableDataset):
    """The per-worker sample pipeline behind :func:`build_loader` (yields ready batches)."""

    def __init__(self, shard_dirs: list[Path], split: str, cfg: StreamConfig, rank: int, world_size: int,
                 train: bool, views: tuple[str, ...]) -> None:
        self.paths, keys, self.ignore_index = [], [], 255
        self.folder_of: list[int] = []
        """Per shard (``SampleRef.shard``): the index of its folder in ``shard_dirs`` (each batch's ``source``)."""
        for folder, shard_dir in enumerate(shard_dirs):  # several folders form one pool (a target + UC Merced)
            manifest = read_manifest(shard_dir)
            shards = split_shards(manifest, split, shard_dir)
            self.paths += [Path(shard_dir) / s["name"] for s in shards]
            self.folder_of += [folder] * len(shards)
            keys += [s["keys"] for s in shards]
            cmap = manifest.get("class_map")
            self.ignore_index = cmap["ignore_index"] if cmap else self.ignore_index
        self.samples = select_samples(keys, cfg.sample_fraction, cfg.seed)
        where = ", ".join(map(str, shard_dirs))
        if not any(self.samples):
            raise DataError(f"{where}: split {split!r} has no samples at sample_fraction={cfg.sample_fraction}")
        self.cfg, self.rank, self.world_size, self.train, self.views = cfg, rank, world_size, train, views
        # Shared with the (persistent) workers: set_epoch in the main process reaches them.
        self.epoch = multiprocessing.Value("q", 0)
        self.corrupt = multiprocessing.Value("q", 0)
        self.corrupt_total = multiprocessing.Value("q", 0)
        """Corrupt samples skipped since this stream was built (never reset: what the run log reports)."""
        self.seen = multiprocessing.Value("q", 0)

    def plans(self) -> list[SlotPlan]:
        """This rank's worker plans for the current epoch."""
        return plan_epoch(self.samples, rank=self.rank, world_size=self.world_size,
                          num_workers=self.cfg.num_workers, batch_size=self.cfg.batch_size,
                          seed=self.cfg.seed, epoch=self.epoch.value, train=self.train)

    def _raw(self, plan: SlotPlan) -> Iterator[tuple[SampleRef, dict[str, bytes] | Exception]]:
        """Read the slot's samples shard by shard, in plan order."""
        i = 0
        while i < len(plan.refs):
            j = i
            while j < len(plan.refs) and plan.refs[j].shard == plan.refs[i].shard:
                j += 1
            yield from read_samples(self.paths[plan.refs[i].shard], sorted(plan.refs[i:j], key=lambda r: r.pos))
            i = j

    def _count_corrupt(self, ref: SampleRef, exc: Exception, planned: int) -> None:
        """Warn about a skipped sample and fail once the rank's corrupt share exceeds the limit."""
        with self.corrupt.get_lock():
            self.corrupt.value += 1
            corrupt = self.corrupt.value
        with self.corrupt_total.get_lock():
            self.corrupt_total.value += 1
        warnings.warn(f"{self.paths[ref.shard]}: skipping corrupt sample {ref.key!r}: {exc}", stacklevel=2)
        if corrupt > self.cfg.max_error_rate * planned:
            raise DataError(f"{self.paths[ref.shard].parent}: {corrupt} corrupt samples this epoch on rank "
                            f"{self.rank}, above max_error_rate={self.cfg.max_error_rate} of {planned} samples")

    def _decoded(self, plan: SlotPlan, rng: np.random.Generator,
                 planned: int) -> Iterator[tuple[SampleRef, Image.Image, Image.Image | None]]:
        """Decoded (ref, image, mask) of the slot: shuffled in train mode, padded to the quota."""
        raw = self._raw(plan)
        if self.train:
            raw = shuffled(raw, self.cfg.shuffle_buffer, rng)
        pool: deque[tuple[SampleRef, dict[str, bytes]]] = deque(maxlen=max(64, 4 * self.cfg.batch_size))
        produced = 0
        for ref, fields in raw:
            with self.seen.get_lock():
                self.seen.value += 1
            try:
                if isinstance(fields, Exception):
                    raise fields
                image, mask = decode(fields, ref.key)
            except Exception as exc:  # any decoder failure is one corrupt sample, counted and skipped
                self._count_corrupt(ref, exc, planned)
                continue
            pool.append((ref, fields))
            yield ref, image, mask
            produced += 1
        while plan.quota is not None and produced < plan.quota:
            if not pool:
                raise DataError(f"{self.paths[0].parent}: no readable sample to fill rank {self.rank}'s batches")
            ref, fields = pool[int(rng.integers(len(pool)))]
            yield (ref, *decode(fields, ref.key))
            produced += 1

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        plans = self.plans()
        plan = plans[worker]
        planned = sum(p.quota if p.quota is not None else len(p.refs) for p in plans)
        rng = np.random.default_rng([self.cfg.seed, self.epoch.value, self.rank, worker])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        batch: list[tuple[SampleRef, np.ndarray, np.ndarray | None]] = []
        for ref, image, mask in self._decoded(plan, rng, planned):
            if self.train:
                image, mask = weak_geometric(image, mask, self.cfg.augment, rng, self.ignore_index)
            else:
                image, mask = np.asarray(image), (np.asarray(mask) if mask is not None else None)
            batch.append((ref, image, mask))
            if len(batch) == self.cfg.batch_size:
                yield self._collate(batch, gen)
                batch = []
        if batch:
            yield self._collate(batch, gen)

    def _collate(self, items: list[tuple[SampleRef, np.ndarray, np.ndarray | None]], gen: torch.Generator) -> Batch:
        """Stack (padding eval tiles to the batch maximum) and add the augmented views."""
        h = max(im.shape[0] for _, im, _ in items)
        w = max(im.shape[1] for _, im, _ in items)
        images = np.zeros((len(items), h, w, 3), dtype=np.uint8)
        has_mask = all(m is not None for _, _, m in items)
        masks = np.full((len(items), h, w), self.ignore_index, dtype=np.uint8) if has_mask else None
        for i, (_, im, m) in enumerate(items):
            images[i, : im.shape[0], : im.shape[1]] = im
            if masks is not None:
                masks[i, : m.shape[0], : m.shape[1]] = m
        factors = brightness_factors(len(items), self.cfg.augment.brightness, gen) if self.train else None
        image = to_float(torch.from_numpy(images), factors, out=_alloc((len(items), 3, h, w), torch.float32))
        batch = Batch(key=[ref.key for ref, _, _ in items], image=image,
                      source=torch.tensor([self.folder_of[ref.shard] for ref, _, _ in items], dtype=torch.int64))
        if masks is not None:
            batch.mask = _alloc(masks.shape, torch.int64).copy_(torch.from_numpy(masks))
        if self.train and "strong" in self.views:
            self._add_strong(batch, gen)
        return batch

    def _add_strong(self, batch: Batch, gen: torch.Generator) -> None:
        """The strong photometric view of the same crops, plus the CutMix plan when enabled."""
        strong = strong_photometric(batch.image, gen, self.cfg.augment)
        if self.cfg.augment.cutmix_prob > 0:
            b, _, h, w = strong.shape
            box, index = cutmix_boxes(b, h, w, self.cfg.augment.cutmix_prob, gen)
            strong = apply_cutmix(strong, box, index)
            batch.cutmix_box, batch.cutmix_index = box, index
        batch.image_strong = strong


class ShardLoader:
    """Iterable over batches with ``len()`` = batches per epoch on this rank and ``set_epoch()``."""

    def __init__(self, stream: ShardStream) -> None:
        self.stream = stream
        cfg = stream.cfg
        self._loader = DataLoader(stream, batch_size=None, num_workers=cfg.num_workers,
                                  pin_memory=cfg.pin_memory, persistent_workers=cfg.num_workers > 0)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle deterministically from (seed, epoch) (train mode); call before iterating."""
        self.stream.epoch.value = epoch

    def __len__(self) -> int:
        return sum(p.batches for p in self.stream.plans())

    def __iter__(self) -> Iterator[Batch]:
        self.stream.corrupt.value = 0
        self.stream.seen.value = 0
        return iter(self._loader)

    @property
    def errors(self) -> dict[str, int]:
        """Corrupt (skipped) and read sample counts of the current or last epoch on this rank."""
        return {"corrupt": int(self.stream.corrupt.value), "seen": int(self.stream.seen.value)}

    @property
    def corrupt_total(self) -> int:
        """Corrupt samples skipped on this rank since the loader was built, over all epochs."""
        return int(self.stream.corrupt_total.value)


def build_loader(shard_dir: str | Path | Sequence[str | Path], split: str, cfg: StreamConfig | None = None, *,
                 rank: int = 0, world_size: int = 1, train: bool = True,
                 views: tuple[str, ...] = ("weak",)) -> ShardLoader:
    """A loader over ``split`` of a shard folder (or of several, read as one pool) for this ``rank``.

    Train: weak augmentation (and the strong view of the same crop if ``"strong" in views``),
    equal batch counts on every rank. Eval (``train=False``): no augmentation, no padding samples,
    every sample seen once across ranks; tiles of different sizes are padded to the batch maximum
    (0 in the image, ignore_index in the mask). Batches are :class:`~distseg.data.batch.Batch` objects.
    """
    cfg = cfg or StreamConfig()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    unknown = set(views) - {"weak", "strong"}
    if unknown or "weak" not in views:
        raise ValueError(f"views must contain 'weak' and optionally 'strong', got {views}")
    if "strong" in views and not train:
        raise ValueError("the strong view is a training augmentation; use train=True")
    dirs = [Path(shard_dir)] if isinstance(shard_dir, (str, Path)) else [Path(d) for d in shard_dir]
    if not dirs:
        raise ValueError("build_loader needs at least one shard folder")
    return ShardLoader(ShardStream(dirs, split, cfg, rank, world_size, train, tuple(views)))
