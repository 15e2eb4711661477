"""Pseudo-labels for the mean teacher: one fused pass from teacher output to labels, mask and stats.

:func:`pseudo_label` turns B×C×H×W logits (or probabilities) into hard labels, a keep mask
(confidence ≥ τ, optionally normalised entropy ≤ a bound, optionally only the lowest-entropy
tiles of the batch) and the per-image statistics the SSL stage logs. The whole computation is one
function compiled with ``torch.compile`` (inductor fuses softmax, max/argmax, entropy, masks and
reductions into a few loops); if compiling fails it falls back, once and for good, to the same
function run eagerly. Nothing reads a value back to the host.

:func:`pseudo_label_reference` is the plain unfused version (separate ops, per-image and
per-class loops) that tests and the benchmark compare against. :func:`tta_probs` averages a
teacher's softmax over flipped and brightness-shifted views.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_TINY = 1e-30


class PseudoLabels(NamedTuple):
    """Output of :func:`pseudo_label`; every field is a tensor on the input's device."""

    labels: Tensor
    """B×H×W int64: argmax class where kept, ``ignore_index`` elsewhere."""
    keep: Tensor
    """B×H×W bool: the pixels the consistency loss uses."""
    confidence: Tensor
    """B×H×W float32: max class probability."""
    entropy: Tensor
    """B×H×W float32: entropy of the class distribution divided by log C (0 = certain, 1 = uniform)."""
    kept_fraction: Tensor
    """[B]: fraction of each image's pixels kept."""
    mean_confidence: Tensor
    """[B]: mean confidence over all pixels of each image."""
    mean_entropy: Tensor
    """[B]: mean normalised entropy over all pixels of each image (what tile selection ranks)."""
    class_hist: Tensor
    """[C] int64: kept pixels per pseudo-label class over the batch."""


def _check(x: Tensor, tau: float | Tensor, max_entropy: float | None, tile_keep_quantile: float | None) -> None:
    """Reject bad shapes and settings before any (compiled) work (a per-class τ is checked by shape only: reading
    its values would stall the device)."""
    if x.dim() != 4 or x.shape[1] < 2:
        raise ValueError(f"pseudo_label expects B×C×H×W with C >= 2, got {tuple(x.shape)}")
    if isinstance(tau, Tensor):
        if tau.shape != (x.shape[1],):
            raise ValueError(f"a per-class tau needs one value per class ({x.shape[1]}), got shape {tuple(tau.shape)}")
    elif not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    if max_entropy is not None and not 0.0 <= max_entropy <= 1.0:
        raise ValueError(f"max_entropy is a normalised entropy in [0, 1], got {max_entropy}")
    if tile_keep_quantile is not None and not 0.0 < tile_keep_quantile <= 1.0:
        raise ValueError(f"tile_keep_quantile must be in (0, 1], got {tile_keep_quantile}")


def _tiles_to_keep(batch: int, quantile: float) -> int:
    """How many tiles the lowest-entropy selection keeps: ceil(q·B), so any q > 0 keeps one."""
    return max(1, math.ceil(quantile * batch - 1e-9))


def _fused(
    x: Tensor, tau: float | Tensor, max_entropy: float | None, from_logits: bool, ignore_index: int, n_tiles: int | None
) -> PseudoLabels:
    """The single-pass computation (compiled by :func:`pseudo_label`; also its eager fallback)."""
    x = x.float()
    num_classes = x.shape[1]
    if from_logits:
        z = x - x.amax(dim=1, keepdim=True)
        total = z.exp().sum(dim=1, keepdim=True)
        log_p = z - total.log()
        p = z.exp() / total
    else:
        p = x
        log_p = x.clamp_min(_TINY).log()
    confidence, argmax = p.max(dim=1)
    entropy = -(p * log_p).sum(dim=1) / math.log(num_classes)
    keep = confidence >= (tau.float()[argmax] if isinstance(tau, Tensor) else tau)
    if max_entropy is not None:
        keep = keep & (entropy <= max_entropy)
    mean_entropy = entropy.mean(dim=(1, 2))
    if n_tiles is not None:
        # rank_i = #{j: e_j < e_i} + #{j < i: e_j == e_i}: a stable sort's rank, ties broken by index.
        e_i, e_j = mean_entropy[:, None], mean_entropy[None, :]
        idx = torch.arange(x.shape[0], device=x.device)
        before = (e_j < e_i) | ((e_j == e_i) & (idx[None, :] < idx[:, None]))
        keep = keep & (before.sum(dim=1) < n_tiles)[:, None, None]
    classes = torch.arange(num_classes, device=x.device)[None, :, None, None]
    class_hist = ((argmax[:, None] == classes) & keep[:, None]).sum(dim=(0, 2, 3))
    return PseudoLabels(
        labels=torch.where(keep, argmax, torch.full_like(argmax, ignore_index)),
        keep=keep,
        confidence=confidence,
        entropy=entropy,
        kept_fraction=keep.float().mean(dim=(1, 2)),
        mean_confidence=confidence.mean(dim=(1, 2)),
        mean_entropy=mean_entropy,
        class_hist=class_hist,
    )


class _Compiled:
    """Lazily compiled :func:`_fused`, disabled for the process after the first failure."""

    fn: Callable[..., PseudoLabels] | None = None
    failed: bool = False

    @classmethod
    def run(cls, *args) -> PseudoLabels:
        """Run the compiled op, or the eager one when compiling is unavailable here."""
        if not cls.failed:
            try:
                if cls.fn is None:
                    cls.fn = torch.compile(_fused)
                return cls.fn(*args)
            except Exception as exc:  # inductor/dynamo failures have no common base class
                cls.failed = True
                warnings.warn(f"pseudo_label: torch.compile failed ({type(exc).__name__}: {exc}); using eager")
        return _fused(*args)


def pseudo_label(
    x: Tensor,
    *,
    tau: float | Tensor = 0.95,
    max_entropy: float | None = None,
    from_logits: bool = True,
    ignore_index: int = 255,
    tile_keep_quantile: float | None = None,
    compile: bool = True,
) -> PseudoLabels:
    """Pseudo-labels, keep mask and per-image stats of teacher output ``x`` (B×C×H×W), in one pass.

    A pixel is kept when its confidence is ≥ ``tau`` (a float, or a [C] tensor read at the pixel's argmax
    class: see :mod:`distseg.ops.thresholds`) and (if set) its normalised entropy is ≤
    ``max_entropy``. With ``tile_keep_quantile=q`` only the ceil(q·B) tiles of the batch with the
    lowest mean entropy keep any pixel (ties go to the earlier tile). ``compile=False`` runs the
    identical eager code.
    """
    _check(x, tau, max_entropy, tile_keep_quantile)
    n_tiles = None if tile_keep_quantile is None else _tiles_to_keep(x.shape[0], tile_keep_quantile)
    bar = tau if isinstance(tau, Tensor) else float(tau)
    args = (x, bar, None if max_entropy is None else float(max_entropy), from_logits, ignore_index, n_tiles)
    return _Compiled.run(*args) if compile else _fused(*args)


def pseudo_label_reference(
    x: Tensor,
    *,
    tau: float | Tensor = 0.95,
    max_entropy: float | None = None,
    from_logits: bool = True,
    ignore_index: int = 255,
    tile_keep_quantile: float | None = None,
) -> PseudoLabels:
    """Unfused reference of :func:`pseudo_label`: separate ops, loops over images and classes."""
    _check(x, tau, max_entropy, tile_keep_quantile)
    x = x.float()
    batch, num_classes = x.shape[:2]
    probs = F.softmax(x, dim=1) if from_logits else x
    log_probs = F.log_softmax(x, dim=1) if from_logits else torch.log(x.clamp_min(_TINY))
    confidence = probs.max(dim=1).values
    argmax = probs.argmax(dim=1)
    entropy = -(probs * log_probs).sum(dim=1) / math.log(num_classes)
    keep = torch.zeros_like(confidence, dtype=torch.bool)
    for c in range(num_classes):
        bar = float(tau[c]) if isinstance(tau, Tensor) else tau
        keep |= (argmax == c) & (confidence >= bar)
    if max_entropy is not None:
        keep = torch.logical_and(keep, entropy <= max_entropy)
    mean_entropy = torch.stack([entropy[b].mean() for b in range(batch)])
    if tile_keep_quantile is not None:
        order = torch.sort(mean_entropy, stable=True).indices
        for b in order[_tiles_to_keep(batch, tile_keep_quantile):].tolist():
            keep[b] = False
    labels = argmax.clone()
    labels[~keep] = ignore_index
    return PseudoLabels(
        labels=labels,
        keep=keep,
        confidence=confidence,
        entropy=entropy,
        kept_fraction=torch.stack([keep[b].float().mean() for b in range(batch)]),
        mean_confidence=torch.stack([confidence[b].mean() for b in range(batch)]),
        mean_entropy=mean_entropy,
        class_hist=torch.stack([((argmax == c) & keep).sum() for c in range(num_classes)]),
    )


# ------------------------------------------------------------------------------ test-time augmentation

_Fn = Callable[[Tensor], Tensor]


def _tta_views(brightness: float) -> dict[str, tuple[_Fn, _Fn]]:
    """name -> (transform of the [0, 1] input, inverse applied to the output probabilities)."""
    same: _Fn = lambda t: t  # noqa: E731
    return {
        "identity": (same, same),
        "hflip": (lambda t: t.flip(-1), lambda t: t.flip(-1)),
        "vflip": (lambda t: t.flip(-2), lambda t: t.flip(-2)),
        "bright+": (lambda t: (t * (1.0 + brightness)).clamp(0.0, 1.0), same),
        "bright-": (lambda t: (t * (1.0 - brightness)).clamp(0.0, 1.0), same),
    }


TTA_TRANSFORMS = tuple(_tta_views(0.0))
"""Names accepted by :func:`tta_probs`."""


def tta_probs(
    model: nn.Module,
    images: Tensor,
    transforms: Sequence[str] = ("identity", "hflip", "vflip", "bright+", "bright-"),
    brightness: float = 0.1,
    views_per_forward: int | None = None,
) -> Tensor:
    """Softmax probabilities of ``model`` on ``images`` (B×3×H×W in [0, 1]) averaged over TTA views.

    Views are concatenated along the batch so the model runs once (or once per
    ``views_per_forward`` views, to bound memory); flips are undone on the output before averaging.
    Brightness views scale the image by 1 ± ``brightness`` and clamp to [0, 1].

    The forwards and the sum run under ``torch.inference_mode`` (no autograd bookkeeping, no version counters);
    the final division runs outside it, so the result is an ordinary tensor that a loss may save for its backward
    (KL consistency does). Nothing is read back to the host.
    """
    table = _tta_views(brightness)
    unknown = [t for t in transforms if t not in table]
    if unknown or not transforms:
        raise ValueError(f"unknown or empty TTA transforms {unknown or list(transforms)}; valid: {list(table)}")
    if not 0.0 <= brightness < 1.0:
        raise ValueError(f"brightness must be in [0, 1), got {brightness}")
    chunk = views_per_forward or len(transforms)
    batch = images.shape[0]
    total: Tensor | None = None
    with torch.inference_mode():
        for start in range(0, len(transforms), chunk):
            names = transforms[start : start + chunk]
            logits = model(torch.cat([table[n][0](images) for n in names]))
            probs = F.softmax(logits.float(), dim=1)
            for i, name in enumerate(names):
                view = table[name][1](probs[i * batch : (i + 1) * batch])
                total = view if total is None else total + view
    return total / len(transforms)
