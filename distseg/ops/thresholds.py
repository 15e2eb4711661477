"""Class-adaptive confidence thresholds for pseudo-labels.

On aerial scenes a fixed τ keeps almost only the classes the teacher already gets right: on the Dubai split
89-99 % of the pixels that pass τ = 0.9 are land or water (docs/ssl_findings.md), so road and building, the classes
SSL should help, hardly enter the consistency loss. Here each class c gets its own threshold

    τ_c = τ · σ_c / max_k σ_k,

where σ_c is a running average of the teacher's mean confidence on the pixels it labels c. The class it is most
sure of keeps τ; a class it is less sure of gets a proportionally lower bar. This is the class-wise "learning
status" of FlexMatch / FreeMatch, measured per pixel by confidence rather than by counts, because counts in
segmentation measure class frequency (land covers most pixels), not how well a class is learnt.

Everything stays on the device: the update is a few reductions and a ``torch.where``, with no host read-back. On
several ranks the per-class sums are all-reduced first, so every replica holds the same thresholds.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class ClassThresholds:
    """Running per-class confidence σ (EMA with ``momentum``) and the thresholds τ_c it implies."""

    def __init__(self, num_classes: int, tau: float, momentum: float = 0.9, device: torch.device | str = "cpu"):
        if not 0.0 <= tau <= 1.0 or not 0.0 <= momentum < 1.0:
            raise ValueError(f"tau must be in [0, 1] and momentum in [0, 1), got {tau}, {momentum}")
        self.tau, self.momentum = float(tau), float(momentum)
        self.sigma = torch.ones(num_classes, device=device)
        """Running mean confidence per class; 1 until a class is first seen (so it starts at the plain τ)."""
        self.seen = torch.zeros(num_classes, dtype=torch.bool, device=device)

    def thresholds(self) -> Tensor:
        """[C] τ_c = τ · σ_c / max σ."""
        return self.tau * self.sigma / self.sigma.amax().clamp_min(1e-12)

    @torch.no_grad()
    def update(self, probs: Tensor) -> None:
        """Fold one batch of teacher probabilities (B×C×H×W) into σ.

        A class's first observation sets its σ outright (a short SSL stage cannot wait for an EMA from 1 to settle);
        later ones move it by ``1 - momentum``. Classes absent from the batch keep their value.
        """
        confidence, argmax = probs.float().max(dim=1)
        index = argmax.flatten()
        sums = torch.zeros(2, self.sigma.numel(), device=self.sigma.device)  # confidence sum, pixel count per class
        sums[0].scatter_add_(0, index, confidence.flatten())
        sums[1].scatter_add_(0, index, torch.ones_like(confidence).flatten())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        present = (sums[1] > 0) & sums[0].isfinite()  # a non-finite teacher output must not poison σ for good
        mean = sums[0] / sums[1].clamp_min(1.0)
        blended = torch.where(self.seen, self.momentum * self.sigma + (1 - self.momentum) * mean, mean)
        self.sigma = torch.where(present, blended, self.sigma)
        self.seen = self.seen | present

    def state_dict(self) -> dict[str, Tensor]:
        return {"sigma": self.sigma.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state["sigma"].shape != self.sigma.shape:
            raise ValueError(f"class thresholds for {state['sigma'].numel()} classes, expected {self.sigma.numel()}")
        self.sigma = state["sigma"].to(self.sigma.device)
        self.seen = state["seen"].to(self.seen.device)
