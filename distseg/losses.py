"""Losses of the distillation and mean-teacher stages (SPEC §3).

* :func:`supervised_loss`: pixel cross-entropy with an ignore index, or OHEM.
* :func:`kd_loss`: temperature-scaled KL from a teacher's soft output, T² scaled, masked.
* :func:`consistency_loss`: the SSL term, CE against pseudo-labels or KL to the teacher, on kept pixels.
* :class:`EWC`: the penalty around an anchor, weighted by a diagonal Fisher (estimated in :mod:`distseg.fisher`).

Every loss here is host-sync free: thresholds are tensors, empty selections give an exact 0 that
still carries a graph, so a training step never waits on the device to decide what to compute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class SupervisedLossConfig:
    """Settings of the supervised pixel loss."""

    kind: Literal["ce", "ohem"] = "ohem"
    """"ce": mean cross-entropy over valid pixels; "ohem": the same over the hard pixels only (the study's loss)."""
    ignore_index: int = 255
    """Mask value of pixels that carry no label."""
    ohem_thresh: float = 0.7
    """OHEM keeps the pixels whose probability of the true class is below this."""
    ohem_min_kept: int = 100_000
    """OHEM keeps at least this many of the hardest valid pixels per batch (all of them when fewer are valid)."""

    def __post_init__(self) -> None:
        if self.kind not in ("ce", "ohem"):
            raise ValueError(f"kind must be 'ce' or 'ohem', got {self.kind!r}")
        if not 0.0 < self.ohem_thresh <= 1.0:
            raise ValueError(f"ohem_thresh must be in (0, 1], got {self.ohem_thresh}")
        if self.ohem_min_kept < 1:
            raise ValueError(f"ohem_min_kept must be >= 1, got {self.ohem_min_kept}")


def _check_logits_target(logits: Tensor, target: Tensor) -> None:
    """Shapes must be B×C×H×W logits against a B×H×W mask (cheap, no device sync)."""
    if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"expected logits B×C×H×W and target B×H×W, got {tuple(logits.shape)} and {tuple(target.shape)}"
        )


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over ``mask``; an exact 0 (with a graph) when the mask is empty."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def _pixel_nll(logits: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Per-pixel negative log-likelihood in fp32; ignored pixels read class 0 and must be masked out."""
    safe = torch.where(valid, target, torch.zeros_like(target))
    return F.cross_entropy(logits.float(), safe, reduction="none")


def _ohem_keep(nll: Tensor, valid: Tensor, thresh: float, min_kept: int) -> Tensor:
    """Hard-pixel mask: true-class prob < thresh, or among the ``min_kept`` lowest-prob valid pixels.

    The k-th smallest probability is found with ``kthvalue`` over the whole batch, with invalid
    pixels set above any probability, so when fewer than ``min_kept`` pixels are valid the k-th
    value is that sentinel and every valid pixel is kept. No host sync.
    """
    prob = torch.exp(-nll.detach())
    flat = torch.where(valid, prob, torch.full_like(prob, 2.0)).flatten()
    k = min(min_kept, flat.numel())
    kth = flat.kthvalue(k).values
    return valid & ((prob < thresh) | (prob <= kth))


def supervised_loss(logits: Tensor, target: Tensor, cfg: SupervisedLossConfig) -> Tensor:
    """Scalar CE / OHEM loss of ``logits`` (B×C×H×W) against ``target`` (B×H×W int64)."""
    _check_logits_target(logits, target)
    valid = target != cfg.ignore_index
    nll = _pixel_nll(logits, target, valid)
    if cfg.kind == "ohem":
        valid = _ohem_keep(nll, valid, cfg.ohem_thresh, cfg.ohem_min_kept)
    return _masked_mean(nll, valid)


def _kl_per_pixel(teacher_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
    """KL(p_t ‖ p_s) summed over the class dim (dim 1) of two log-probability maps."""
    return (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(1)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float = 3.0, mask: Tensor | None = None) -> Tensor:
    """Distillation loss T²·KL(softmax(t/T) ‖ softmax(s/T)), averaged over pixels where ``mask`` is True.

    The teacher is detached: it is a target, never trained through this term. The T² factor keeps
    the gradient scale independent of the temperature (Hinton et al., 2015).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} differ")
    if T <= 0:
        raise ValueError(f"temperature must be > 0, got {T}")
    log_s = F.log_softmax(student_logits.float() / T, dim=1)
    log_t = F.log_softmax(teacher_logits.detach().float() / T, dim=1)
    kl = _kl_per_pixel(log_t, log_s) * (T * T)
    if mask is None:
        return kl.mean()
    return _masked_mean(kl, mask)


def consistency_loss(
    student_logits: Tensor,
    pseudo_labels: Tensor,
    keep_mask: Tensor,
    kind: Literal["ce", "kl"] = "ce",
    teacher_probs: Tensor | None = None,
    T: float = 1.0,
    pixel_weights: Tensor | None = None,
) -> Tensor:
    """Mean-teacher unlabelled loss over the kept pixels (0 with a graph when none is kept).

    ``"ce"``: cross-entropy of the student against the hard pseudo-labels. ``"kl"``: T²·KL from
    the teacher's probabilities (sharpened as p^(1/T), renormalised) to softmax(student/T).
    ``pixel_weights`` (B×H×W) scales each pixel's term before the mean over kept pixels (the class-balance guard
    rail's per-class weights, :mod:`distseg.ops.balance`).
    """
    _check_logits_target(student_logits, pseudo_labels)
    if kind == "ce":
        per_pixel = _pixel_nll(student_logits, pseudo_labels, keep_mask)
    elif kind == "kl":
        if teacher_probs is None or teacher_probs.shape != student_logits.shape:
            raise ValueError("kind='kl' needs teacher_probs of the student logits' shape")
        log_t = F.log_softmax(teacher_probs.detach().float().clamp_min(1e-12).log() / T, dim=1)
        log_s = F.log_softmax(student_logits.float() / T, dim=1)
        per_pixel = _kl_per_pixel(log_t, log_s) * (T * T)
    else:
        raise ValueError(f"consistency kind must be 'ce' or 'kl', got {kind!r}")
    if pixel_weights is not None:
        per_pixel = per_pixel * pixel_weights.detach()
    return _masked_mean(per_pixel, keep_mask)


# --------------------------------------------------------------------------------------- EWC


class _Matched(NamedTuple):
    """Parameters paired with their anchor and √Fisher, ready for one foreach computation."""

    params: list[Tensor]
    anchors: list[Tensor]
    sqrt_fisher: list[Tensor]
    skipped: list[str]


class EWC:
    """Elastic weight consolidation penalty (λ/2)·Σ F (θ − θ*)² around an anchor θ*.

    Parameters missing from the anchor or Fisher, or whose shape changed (a classifier replaced for
    a new class set), are left out. :meth:`bind` matches a model's parameters once; the penalty is
    then ‖√F·(θ − θ*)‖² per tensor through ``torch._foreach_norm``, with no per-tensor Python
    branching in the training step.
    """

    def __init__(self, anchor: dict[str, Tensor], fisher: dict[str, Tensor], lam: float) -> None:
        if lam < 0:
            raise ValueError(f"EWC lambda must be >= 0, got {lam}")
        self.anchor = {k: v.detach() for k, v in anchor.items()}
        self.fisher = {k: v.detach() for k, v in fisher.items()}
        self.lam = float(lam)
        self._bound: _Matched | None = None

    def _match(self, named_parameters: Iterable[tuple[str, Tensor]]) -> _Matched:
        """Pair parameters with anchor and Fisher entries of the same name and shape."""
        out = _Matched([], [], [], [])
        for name, p in named_parameters:
            a, f = self.anchor.get(name), self.fisher.get(name)
            if a is None or f is None or a.shape != p.shape or f.shape != p.shape:
                out.skipped.append(name)
                continue
            out.params.append(p)
            out.anchors.append(a.to(device=p.device, dtype=p.dtype))
            out.sqrt_fisher.append(f.to(device=p.device, dtype=p.dtype).clamp_min(0).sqrt())
        return out

    def bind(self, model: nn.Module) -> "EWC":
        """Match ``model``'s parameters once so that :meth:`penalty` needs no argument; returns self."""
        self._bound = self._match(model.named_parameters())
        return self

    @property
    def skipped(self) -> list[str]:
        """Names of the bound model's parameters that the penalty leaves out."""
        if self._bound is None:
            raise RuntimeError("EWC.skipped: call bind(model) first")
        return list(self._bound.skipped)

    def penalty(self, named_parameters: Iterable[tuple[str, Tensor]] | None = None) -> Tensor:
        """The scalar penalty: of the bound model, or of ``named_parameters`` (matched on the fly)."""
        if named_parameters is not None:
            matched = self._match(named_parameters)
        elif self._bound is not None:
            matched = self._bound
        else:
            raise RuntimeError("EWC.penalty: pass named_parameters or call bind(model) first")
        if not matched.params:
            return torch.zeros(())
        diff = torch._foreach_sub(matched.params, matched.anchors)
        torch._foreach_mul_(diff, matched.sqrt_fisher)
        sq = torch.stack(torch._foreach_norm(diff)).float().pow(2).sum()
        return 0.5 * self.lam * sq
