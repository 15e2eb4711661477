"""Cross-domain ClassMix: labelled pixels pasted into the pool's strong views, with their true labels.

When the pool is imagery of another place, the teacher's pseudo-labels there are weakest on exactly the objects the
map is for (buildings of a new town: the fine-tune misses most of them). Pasting the pixels of some classes of a
labelled crop into a pool image gives the student those objects with exact labels *in the pool's context* (its
roofs' neighbours, its vegetation, its colours around them), next to the pseudo-labelled rest of the image. The
method is DACS's (Tranheden et al., WACV 2021), after ClassMix (Olsson et al., 2021): each pasted crop contributes
the pixels of a random half of the classes present in it, except its majority class. Leaving the majority class
out is this module's change to DACS: with two classes (background / building) half the crops would otherwise paste
their background, i.e. most of the crop, and the student would see source imagery with a few target holes instead
of target imagery with source objects.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Mixed(NamedTuple):
    """A pool batch after pasting; every tensor aligned pixel for pixel."""

    image: Tensor
    """B×3×H×W: the pool image with the pasted pixels of its labelled crop."""
    labels: Tensor
    """B×H×W: the labelled crop's labels where pasted, the pseudo-labels elsewhere."""
    keep: Tensor
    """B×H×W bool: every pasted pixel, and the kept pseudo-labels elsewhere."""
    pasted: Tensor
    """B×H×W bool: where the labelled crop was pasted."""


def class_halves(masks: Tensor, num_classes: int, ignore_index: int, generator: torch.Generator | None = None
                 ) -> Tensor:
    """B×H×W bool: for each label map, the pixels of a random half (rounded up) of the classes present in it other
    than its majority class (nothing when that is the only one).

    Ignored pixels are never chosen: they have no label to carry.
    """
    valid = (masks >= 0) & (masks < num_classes) & (masks != ignore_index)
    safe = masks.clamp(0, num_classes - 1).flatten(1)
    counts = torch.zeros(masks.shape[0], num_classes, dtype=torch.int64, device=masks.device)
    counts.scatter_add_(1, safe, valid.flatten(1).long())
    candidates = counts > 0
    candidates.scatter_(1, counts.argmax(1, keepdim=True), False)  # the majority class stays the pool image's
    wanted = (candidates.sum(1, keepdim=True) + 1) // 2
    # a random order of the candidates (on the device: no host sync in the training step); take the first `wanted`
    scores = torch.rand(candidates.shape, generator=generator).to(masks.device).masked_fill(~candidates, -1.0)
    rank = scores.argsort(1, descending=True).argsort(1)
    chosen = candidates & (rank < wanted)
    return chosen.gather(1, safe).view_as(masks) & valid


def paste_labelled(image: Tensor, labels: Tensor, keep: Tensor, src_image: Tensor, src_mask: Tensor, *,
                   num_classes: int, ignore_index: int, prob: float = 1.0,
                   generator: torch.Generator | None = None) -> Mixed:
    """Paste half the classes of labelled crop ``i % B_src`` into pool sample ``i``, for each sample with
    probability ``prob``.

    ``image``/``labels``/``keep`` are the pool batch's strong view and its pseudo-labels and keep mask; the
    labelled crops must have the same height and width.
    """
    if src_image.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"labelled crops {tuple(src_image.shape[-2:])} and pool crops {tuple(image.shape[-2:])} "
                         "differ in size")
    index = torch.arange(image.shape[0], device=image.device) % src_image.shape[0]
    src_image, src_mask = src_image[index], src_mask[index]
    pasted = class_halves(src_mask, num_classes, ignore_index, generator)
    if prob < 1.0:
        draw = torch.rand(image.shape[0], generator=generator, device="cpu").to(image.device) < prob
        pasted &= draw.view(-1, 1, 1)
    return Mixed(
        image=torch.where(pasted.unsqueeze(1), src_image.to(image.dtype), image),
        labels=torch.where(pasted, src_mask, labels),
        keep=keep | pasted,
        pasted=pasted,
    )
