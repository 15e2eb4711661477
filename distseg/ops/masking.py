"""Edge-guided masked image modelling: edge maps, patch masks sampled by edge density, and the masked loss.

All of it runs on the device, batched, with no host syncs:

* :func:`edge_map`: Sobel gradient magnitude (kornia) of the grey image, scaled per image to [0, 1].
* :func:`sample_patch_mask`: ``ratio`` of each image's patches, drawn without replacement with probabilities that mix
  uniform and edge-density rank: ``p_i = (1 − w)/N + w · r_i / Σ r`` (``r_i`` the patch's rank by edge density, 1 for
  the flattest). ``w = 0`` is plain uniform random masking; ``w = 1`` masks edge-rich patches most often.
* :func:`patch_normalised` and :func:`masked_reconstruction_loss`: the target is each patch's pixels normalised by
  the patch's own mean and std (as in MAE), the loss is L1 or L2 over masked pixels only, weighted by
  ``1 + β · edge``; ``β = 0`` is the plain loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_GREY = (0.299, 0.587, 0.114)


def edge_map(images: Tensor) -> Tensor:
    """B×1×H×W edge strength in [0, 1]: kornia's Sobel magnitude of the grey image over its per-image maximum."""
    from kornia.filters import sobel

    weights = images.new_tensor(_GREY).view(1, 3, 1, 1)
    grey = (images.float() * weights).sum(1, keepdim=True)
    edges = sobel(grey)
    return edges / edges.flatten(1).amax(1).clamp_min(1e-6).view(-1, 1, 1, 1)


def patch_density(edges: Tensor, patch: int) -> Tensor:
    """B×(H/p)×(W/p) mean edge strength of every patch."""
    return F.avg_pool2d(edges, patch).squeeze(1)


def check_patching(size: tuple[int, int], patch: int, ratio: float) -> None:
    """The crop must tile into whole patches, and the ratio must leave some patches masked and some visible."""
    if patch < 1 or size[0] % patch or size[1] % patch:
        raise ValueError(f"patch size {patch} does not divide the crop {size[0]}x{size[1]}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")


def masking_probabilities(density: Tensor, edge_weight: float) -> Tensor:
    """B×N sampling probabilities: (1 − w)/N + w · rank/Σrank, ranks by edge density (ties broken by position)."""
    flat = density.flatten(1)
    n = flat.shape[1]
    ranks = flat.argsort(dim=1, stable=True).argsort(dim=1, stable=True).float() + 1.0  # 1 = flattest patch
    return (1.0 - edge_weight) / n + edge_weight * ranks / ranks.sum(1, keepdim=True)


def sample_patch_mask(density: Tensor, ratio: float, edge_weight: float,
                      generator: torch.Generator | None = None) -> Tensor:
    """B×(H/p)×(W/p) bool: ``round(ratio · N)`` patches per image, sampled without replacement.

    Gumbel-top-k: the k largest of ``log p_i + Gumbel`` are an exact sample without replacement from ``p``, so the
    whole batch is drawn in one vectorised op.
    """
    if not 0.0 <= edge_weight <= 1.0:
        raise ValueError(f"edge_weight must be in [0, 1], got {edge_weight}")
    b, gh, gw = density.shape
    n = gh * gw
    k = min(n - 1, max(1, round(ratio * n)))
    probs = masking_probabilities(density, edge_weight)
    uniform = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=torch.float32)
    keys = probs.log() - torch.log(-torch.log(uniform.clamp(1e-12, 1 - 1e-7)))
    chosen = keys.topk(k, dim=1).indices
    mask = torch.zeros(b, n, dtype=torch.bool, device=density.device).scatter_(1, chosen, True)
    return mask.view(b, gh, gw)


def pixel_mask(mask: Tensor, patch: int) -> Tensor:
    """B×1×H×W float mask (1 = masked) from the patch grid."""
    return mask.float().repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1)


def patch_normalised(images: Tensor, patch: int, eps: float = 1e-6) -> Tensor:
    """Each p×p patch of B×C×H×W images normalised by its own mean and std (over its pixels and channels)."""
    b, c, h, w = images.shape
    patches = F.unfold(images.float(), patch, stride=patch)  # B × (C·p·p) × L
    mean = patches.mean(1, keepdim=True)
    std = patches.var(1, keepdim=True, unbiased=False).add(eps).sqrt()
    return F.fold((patches - mean) / std, (h, w), patch, stride=patch)


def masked_reconstruction_loss(pred: Tensor, target: Tensor, mask: Tensor, edges: Tensor, *, beta: float = 0.0,
                               kind: str = "l1") -> Tensor:
    """Mean error over masked pixels (and channels), each pixel weighted by ``1 + β · edge``.

    ``mask`` and ``edges`` are B×1×H×W; a perfect reconstruction of the masked pixels gives exactly 0, whatever the
    prediction is elsewhere.
    """
    if kind not in ("l1", "l2"):
        raise ValueError(f"loss kind must be 'l1' or 'l2', got {kind!r}")
    diff = (pred.float() - target.float()).abs()
    err = diff if kind == "l1" else diff.square()
    weight = mask * (1.0 + beta * edges)
    return (err * weight).sum() / (weight.sum() * pred.shape[1]).clamp_min(1e-6)
