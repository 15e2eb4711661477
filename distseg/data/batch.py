"""The typed batch that loaders produce and stage tasks consume."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch


@dataclasses.dataclass
class Batch:
    """One batch of tiles, on the host (from a loader) or on the device (after :meth:`to`).

    Images are float32 B×3×H×W in [0, 1] (the model normalises); masks int64 B×H×W with ``ignore_index``.
    """

    key: list[str]
    """Sample keys, in batch order."""
    image: torch.Tensor
    """The weak view (train) or the tile itself (eval)."""
    mask: torch.Tensor | None = None
    """Labels; None for unlabelled splits."""
    image_strong: torch.Tensor | None = None
    """The strong photometric view of the same crops (loaders asked for the 'strong' view)."""
    cutmix_box: torch.Tensor | None = None
    """B×H×W bool: where the strong view holds a box pasted from sample ``cutmix_index``."""
    cutmix_index: torch.Tensor | None = None
    """B: the sample each box was taken from."""
    source: torch.Tensor | None = None
    """B int64: which of the loader's shard folders each sample was read from, in the order they were given."""

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        """A copy with every tensor on ``device``."""
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=non_blocking)
        return Batch(**moved)

    def __len__(self) -> int:
        return int(self.image.shape[0])


class Batches(NamedTuple):
    """What a training step receives: one batch per stream the stage kind declares (None when not declared)."""

    labelled: Batch | None = None
    unlabelled: Batch | None = None
