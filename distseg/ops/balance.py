"""A guard rail for self-training: the class share of kept pseudo-labels against the labelled class share.

Self-training feeds on itself. A class the teacher is unsure of (buildings on an unfamiliar site) passes the
confidence threshold on few pixels, so it gets little consistency gradient, so the student predicts it less, so the
next teacher keeps even fewer of its pixels. The opposite run-away (one class swallowing the image) has the same
loop. Both show up first in one number per class,

    ratio_c = s_c / p_c,

where s_c is the running share of class c among the kept pseudo-label pixels (an EMA over steps) and p_c its share
among the labelled pixels (the manifest's class pixel counts of the train split). :class:`ClassBalance` tracks it
and answers with two corrections:

- **class weights** w_c = clip(p_c / s_c, 1/r, r), rescaled so that the kept pixels' mean weight is 1. Weighting
  each kept pixel's consistency loss by w of its pseudo-label gives class c the weighted share s_c·w_c/Σ s·w,
  which equals p_c while the ratio stays within [1/r, r] (distribution alignment in the loss, as ReMixMatch aligns
  predictions and DAFormer's rare-class terms rebalance sampling). The loss scale is unchanged, so λ_u keeps its
  meaning.
- **damping** d = min(1, r / max_c max(ratio_c, 1/ratio_c)), a factor for λ_u: 1 while every class stays within a
  factor r of its labelled share, then falling as the worst class drifts further (r/4r = 0.25 at four times past
  the bound). Past the clip, re-weighting can no longer restore the share, so the step leans on the labels
  instead: a drifting run degrades towards its λ_u = 0 control rather than collapsing.

The target site may differ from the labelled one in its true class shares; r is how much difference is tolerated
before the guard rail acts (default 2: Kampala's building share is within 1.1× Nairobi's, a pseudo-label share
of 1–3 % against 30 % is 10–30× off). Classes absent from the labelled pixels have no reference: they keep weight
1, ratio 1 and never damp.

Everything stays on the device (no host read-back): the update is an all-reduce of the batch's class counts over
ranks, a division and a ``torch.where``, so every replica holds the same state.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

_TINY = 1e-6
"""Floor of a running share, so a class that vanished from the pseudo-labels gives a large finite ratio."""


def labelled_share(manifest: dict[str, Any], class_names: Sequence[str], split: str = "train") -> list[float]:
    """Each class's share of the labelled pixels of ``split`` from a shard manifest (ignored pixels left out).

    Raises ValueError naming the split when the manifest has no class pixel counts for it or none is labelled.
    """
    info = manifest.get("splits", {}).get(split, {})
    pixels = info.get("class_pixels")
    if not pixels:
        raise ValueError(f"manifest has no class pixel counts for split {split!r}")
    counts = [float(pixels.get(name, 0)) for name in class_names]
    total = sum(counts)
    if total <= 0:
        raise ValueError(f"split {split!r} has no labelled pixel of classes {list(class_names)}")
    return [c / total for c in counts]


class ClassBalance:
    """Running class share of kept pseudo-label pixels (EMA with ``momentum``) against ``target`` (labelled)."""

    def __init__(self, target: Sequence[float] | Tensor, bound: float = 2.0, momentum: float = 0.95,
                 device: torch.device | str = "cpu"):
        target = torch.as_tensor(target, dtype=torch.float32, device=device).flatten()
        if target.numel() < 2 or not bool(torch.isfinite(target).all()) or bool((target < 0).any()) \
                or float(target.sum()) <= 0:
            raise ValueError(f"target must be >= 2 non-negative finite class shares with a positive sum, got "
                             f"{target.tolist()}")
        if bound <= 1.0 or not 0.0 <= momentum < 1.0:
            raise ValueError(f"bound must be > 1 and momentum in [0, 1), got {bound}, {momentum}")
        self.bound, self.momentum = float(bound), float(momentum)
        self.target = target / target.sum()
        """[C] labelled class shares (normalised)."""
        self.known = self.target > 0
        """Classes with labelled pixels; the others are never corrected."""
        self.share = self.target.clone()
        """[C] running share of kept pseudo-label pixels; the target until the first batch with kept pixels."""
        self.seen = torch.zeros((), dtype=torch.bool, device=device)

    @torch.no_grad()
    def update(self, class_hist: Tensor) -> None:
        """Fold one batch's kept pseudo-label pixels per class ([C] counts, e.g. ``PseudoLabels.class_hist``).

        The first batch that keeps any pixel sets the share outright (a short stage cannot wait for an EMA from the
        target to settle); later ones move it by ``1 - momentum``. A batch that keeps nothing, or a non-finite one,
        leaves the state alone.
        """
        counts = class_hist.detach().to(device=self.share.device, dtype=torch.float32).flatten()
        if counts.numel() != self.share.numel():
            raise ValueError(f"class_hist has {counts.numel()} classes, expected {self.share.numel()}")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            counts = counts.clone()
            dist.all_reduce(counts)
        total = counts.sum()
        valid = (total > 0) & torch.isfinite(total)
        batch = counts / total.clamp_min(1.0)
        blended = torch.where(self.seen, self.momentum * self.share + (1 - self.momentum) * batch, batch)
        self.share = torch.where(valid, blended, self.share)
        self.seen = self.seen | valid

    def ratio(self) -> Tensor:
        """[C] running share / labelled share (1 for classes without labelled pixels): the metric to log."""
        raw = self.share.clamp_min(_TINY) / self.target.clamp_min(_TINY)
        return torch.where(self.known, raw, torch.ones_like(raw))

    def class_weights(self) -> Tensor:
        """[C] per-class weights of the consistency loss: clip(1/ratio, 1/r, r), mean 1 over the kept pixels."""
        raw = torch.where(self.known, (1.0 / self.ratio()).clamp(1.0 / self.bound, self.bound),
                          torch.ones_like(self.share))
        return raw / (self.share * raw).sum().clamp_min(_TINY)

    def damping(self) -> Tensor:
        """Scalar factor for λ_u in (0, 1]: 1 while every class's ratio is within [1/r, r], else r / worst excess."""
        ratio = self.ratio()
        excess = torch.maximum(ratio, 1.0 / ratio).amax()
        return (self.bound / excess).clamp(max=1.0)

    def pixel_weights(self, labels: Tensor, keep: Tensor) -> Tensor:
        """B×H×W weights: the class weight of each kept pixel's pseudo-label, 0 where not kept."""
        index = torch.where(keep, labels, torch.zeros_like(labels)).long()
        return torch.where(keep, self.class_weights()[index], torch.zeros((), device=labels.device))

    def state_dict(self) -> dict[str, Tensor]:
        return {"share": self.share.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state["share"].shape != self.share.shape:
            raise ValueError(f"class balance for {state['share'].numel()} classes, expected {self.share.numel()}")
        self.share = state["share"].to(self.share.device)
        self.seen = state["seen"].to(self.seen.device)
