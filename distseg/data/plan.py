"""Which samples each (rank, worker) reads in an epoch: pure functions over the manifest.

The manifest lists every shard's sample keys, so the whole epoch can be planned before reading a
byte. Train epochs concatenate the shards in a seeded order and hand each rank a contiguous,
disjoint range; every rank then yields the same number of full batches, padding the few missing
samples by resampling its own range. Eval epochs keep file order, read every sample once and pad
nothing.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from distseg.data.splitting import stable_hash


@dataclasses.dataclass(frozen=True)
class SampleRef:
    """One sample: its shard (index into the split's shard list), position in that tar, and key."""

    shard: int
    pos: int
    key: str


@dataclasses.dataclass(frozen=True)
class SlotPlan:
    """What one (rank, worker) reads in an epoch."""

    refs: tuple[SampleRef, ...]
    """Samples to read, in shard order (the shuffle buffer reorders them)."""
    batches: int
    """Batches this slot yields."""
    quota: int | None
    """Exact sample count to yield (train: batches × batch size, padding by resampling); None in eval."""


def select_samples(shard_keys: list[list[str]], fraction: float, seed: int) -> list[list[SampleRef]]:
    """Per shard, the samples kept by ``sample_fraction``: those whose hash of (key, seed) falls below it.

    Hashing the key (not the position) makes the subset independent of how the data was sharded, and
    nested: the 10 % subset is contained in the 50 % one for the same seed.
    """
    out = []
    for s, keys in enumerate(shard_keys):
        refs = [SampleRef(s, p, k) for p, k in enumerate(keys)
                if fraction >= 1.0 or stable_hash("fraction", seed, k) < fraction * 2**64]
        out.append(refs)
    return out


def _train_slots(order: list[SampleRef], rank: int, world: int, workers: int, batch: int) -> list[SlotPlan]:
    """Split this rank's contiguous range over workers in proportion to their batch counts."""
    n = len(order)
    per_rank = math.ceil(n / world)
    n_batches = max(1, math.ceil(per_rank / batch))
    mine = order[rank * n // world:(rank + 1) * n // world]
    total = n_batches * batch
    slots, cum = [], 0
    for w in range(workers):
        nb = n_batches // workers + (w < n_batches % workers)
        lo = len(mine) * cum // total
        cum += nb * batch
        piece = mine[lo:len(mine) * cum // total]
        if nb and not piece:  # tiny splits: borrow one sample so every slot can fill its batches
            piece = [mine[w % len(mine)]] if mine else [order[(rank * workers + w) % n]]
        slots.append(SlotPlan(tuple(piece), nb, nb * batch))
    return slots


def _eval_slots(order: list[SampleRef], rank: int, world: int, workers: int, batch: int) -> list[SlotPlan]:
    """Contiguous, disjoint ranges in file order; the last batch of each slot may be short."""
    n = len(order)
    mine = order[rank * n // world:(rank + 1) * n // world]
    slots = []
    for w in range(workers):
        piece = mine[w * len(mine) // workers:(w + 1) * len(mine) // workers]
        slots.append(SlotPlan(tuple(piece), math.ceil(len(piece) / batch), None))
    return slots


def plan_epoch(samples: list[list[SampleRef]], *, rank: int, world_size: int, num_workers: int,
               batch_size: int, seed: int, epoch: int, train: bool) -> list[SlotPlan]:
    """The per-worker plans of ``rank`` for ``epoch`` (one slot when ``num_workers`` is 0)."""
    workers = max(1, num_workers)
    if train:
        perm = np.random.default_rng([seed, epoch]).permutation(len(samples))
        order = [ref for s in perm for ref in samples[s]]
        return _train_slots(order, rank, world_size, workers, batch_size)
    order = [ref for refs in samples for ref in refs]
    return _eval_slots(order, rank, world_size, workers, batch_size)
