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

A pool of several folders (the rest of the labelled town plus the imagery to map) is tracked **per source**: one
running share per folder, each against the labelled share, weights per source, and damping by the worst class of
the worst source. One ratio over the mixed pool hid a collapse: with Kampala's imagery alone the teacher's kept
building share started at 5–7 % against 29 % (ratio 0.2, damped), while over Nairobi + Kampala the same statistic
read 0.86–0.98, the labelled town's confident buildings standing in for the target's missing ones.

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


def source_class_counts(labels: Tensor, keep: Tensor, source: Tensor, sources: int, classes: int) -> Tensor:
    """[S, C] kept pixels per (pool source, pseudo-label class): ``source`` is each pixel's pool folder (B×H×W, or B
    for whole samples). A scatter-add on the device, so counting costs no host read-back."""
    if source.dim() == 1:
        source = source[:, None, None].expand_as(labels)
    index = source.long() * classes + torch.where(keep, labels, torch.zeros_like(labels)).long()
    counts = torch.zeros(sources * classes, device=labels.device, dtype=torch.float32)
    counts.scatter_add_(0, index.flatten(), keep.flatten().to(torch.float32))
    return counts.view(sources, classes)


class ClassBalance:
    """Running class share of kept pseudo-label pixels per pool source (EMA with ``momentum``) against ``target``
    (the labelled share; one reference for every source)."""

    def __init__(self, target: Sequence[float] | Tensor, bound: float = 2.0, momentum: float = 0.95,
                 device: torch.device | str = "cpu", sources: int = 1):
        target = torch.as_tensor(target, dtype=torch.float32, device=device).flatten()
        if target.numel() < 2 or not bool(torch.isfinite(target).all()) or bool((target < 0).any()) \
                or float(target.sum()) <= 0:
            raise ValueError(f"target must be >= 2 non-negative finite class shares with a positive sum, got "
                             f"{target.tolist()}")
        if bound <= 1.0 or not 0.0 <= momentum < 1.0:
            raise ValueError(f"bound must be > 1 and momentum in [0, 1), got {bound}, {momentum}")
        if sources < 1:
            raise ValueError(f"sources must be >= 1, got {sources}")
        self.bound, self.momentum = float(bound), float(momentum)
        self.target = target / target.sum()
        """[C] labelled class shares (normalised)."""
        self.known = self.target > 0
        """Classes with labelled pixels; the others are never corrected."""
        self.share = self.target.expand(sources, -1).clone()
        """[S, C] running share of kept pseudo-label pixels per source; the target until that source's first batch
        with kept pixels."""
        self.seen = torch.zeros(sources, dtype=torch.bool, device=device)
        """[S] whether each source has had kept pixels yet."""

    @torch.no_grad()
    def update(self, counts: Tensor) -> None:
        """Fold one batch's kept pseudo-label pixels, [S, C] per source (:func:`source_class_counts`) or [C] for a
        single source (``PseudoLabels.class_hist``).

        A source's first batch that keeps any pixel sets its share outright (a short stage cannot wait for an EMA
        from the target to settle); later ones move it by ``1 - momentum``. A source that keeps nothing in a batch,
        or a non-finite one, keeps its state.
        """
        counts = counts.detach().to(device=self.share.device, dtype=torch.float32)
        counts = counts.reshape(1, -1) if counts.dim() == 1 else counts
        if counts.shape != self.share.shape:
            raise ValueError(f"class counts of shape {tuple(counts.shape)}, expected {self.share.shape[0]} "
                             f"source(s) × {self.share.shape[1]} classes")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            counts = counts.clone()
            dist.all_reduce(counts)
        total = counts.sum(dim=1, keepdim=True)
        valid = (total > 0) & torch.isfinite(total)
        batch = counts / total.clamp_min(1.0)
        seen = self.seen[:, None]
        blended = torch.where(seen, self.momentum * self.share + (1 - self.momentum) * batch, batch)
        self.share = torch.where(valid, blended, self.share)
        self.seen = self.seen | valid[:, 0]

    def ratio(self) -> Tensor:
        """[S, C] running share / labelled share (1 for classes without labelled pixels): the metric to log."""
        raw = self.share.clamp_min(_TINY) / self.target.clamp_min(_TINY)
        return torch.where(self.known, raw, torch.ones_like(raw))

    def class_weights(self) -> Tensor:
        """[S, C] per-class weights of the consistency loss: clip(1/ratio, 1/r, r), mean 1 over each source's kept
        pixels."""
        raw = torch.where(self.known, (1.0 / self.ratio()).clamp(1.0 / self.bound, self.bound),
                          torch.ones_like(self.share))
        return raw / (self.share * raw).sum(dim=1, keepdim=True).clamp_min(_TINY)

    def damping(self) -> Tensor:
        """Scalar factor for λ_u in (0, 1]: 1 while every source's ratios are within [1/r, r], else r / worst
        excess."""
        ratio = self.ratio()
        excess = torch.maximum(ratio, 1.0 / ratio).amax()
        return (self.bound / excess).clamp(max=1.0)

    def pixel_weights(self, labels: Tensor, keep: Tensor, source: Tensor | None = None) -> Tensor:
        """B×H×W weights: the class weight of each kept pixel's pseudo-label in its source (B×H×W; None: source 0),
        0 where not kept."""
        index = torch.where(keep, labels, torch.zeros_like(labels)).long()
        source = torch.zeros_like(index) if source is None else source.long()
        return torch.where(keep, self.class_weights()[source, index], torch.zeros((), device=labels.device))

    def state_dict(self) -> dict[str, Tensor]:
        return {"share": self.share.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore; a [C] share (checkpoints written before per-source tracking) is one source's."""
        share, seen = state["share"], state["seen"]
        share, seen = (share.reshape(1, -1), seen.reshape(1)) if share.dim() == 1 else (share, seen)
        if share.shape != self.share.shape:
            raise ValueError(f"class balance for {share.shape[0]} source(s) × {share.shape[1]} classes, expected "
                             f"{self.share.shape[0]} × {self.share.shape[1]}")
        self.share = share.to(self.share.device)
        self.seen = seen.to(self.seen.device)
