"""The ``ddpm_head`` architecture: frozen DDPM features + a residual MLP head, as one ``forward(image) -> logits``.

Its config holds the denoiser's own config (copied from the ddpm stage it was trained on), so a ``ddpm_head`` stage
folder alone rebuilds the whole model: ``evaluate``, ``predict`` and ``bench infer`` load it like any other folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from distseg.models.architectures import Architecture
from distseg.models.denoiser import DenoiserConfig
from distseg.models.diffusion_features import DiffusionFeatures, ExtractorConfig
from distseg.models.mlp_head import HeadConfig, ResidualMLPHead


@dataclass
class DDPMSegmenterConfig:
    """A denoiser, which of its features to use, and the head that classifies them."""

    architecture: Literal["ddpm_head"] = "ddpm_head"
    """The entry of ``distseg.models.architectures`` this config builds (recorded in stage.json)."""
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    """The UNet and noise schedule the features come from (the ddpm stage's ``config.model``)."""
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    """Noise levels, decoder layers, noise seed and feature resolution."""
    head: HeadConfig = field(default_factory=HeadConfig)
    """The residual MLP head."""
    num_classes: int = 6
    """Output classes (logit channels)."""

    def __post_init__(self) -> None:
        if self.architecture != "ddpm_head":
            raise ValueError(f"a DDPMSegmenterConfig describes a ddpm_head model, not {self.architecture!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        self.extractor.check(self.denoiser)


class DDPMSegmenter(nn.Module):
    """Images in [0, 1] (B×3×H×W) -> logits (B×C×H×W) at the input size.

    Submodules: ``features`` (:class:`DiffusionFeatures`, whose ``unet`` is frozen unless
    :meth:`freeze_extractor` (False) is called) and ``head`` (:class:`ResidualMLPHead`).
    """

    def __init__(self, cfg: DDPMSegmenterConfig) -> None:
        super().__init__()
        self.config = cfg
        self.features = DiffusionFeatures(cfg.denoiser, cfg.extractor)
        self.head = ResidualMLPHead(self.features.channels, cfg.num_classes, cfg.head)
        self.freeze_extractor(True)

    def freeze_extractor(self, frozen: bool = True) -> None:
        """Frozen (default): the UNet gets no gradients and stays in eval mode. False: the unfrozen ablation."""
        self.features.frozen = frozen
        self.features.unet.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> DDPMSegmenter:
        """As ``nn.Module.train``, but a frozen UNet stays in eval mode (dropout off), whatever the head does."""
        super().train(mode)
        if self.features.frozen:
            self.features.unet.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(images))
        if logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits


def build_ddpm_segmenter(cfg: DDPMSegmenterConfig) -> DDPMSegmenter:
    """The segmenter of ``cfg`` with random weights (a stage loads the denoiser's weights into ``features.unet``)."""
    return DDPMSegmenter(cfg)


def _describe(cfg: DDPMSegmenterConfig) -> str:
    ex = cfg.extractor
    return (f"ddpm_head unet {'-'.join(map(str, cfg.denoiser.channels))} t={list(ex.timesteps)} "
            f"blocks={list(ex.blocks)}")


ARCHITECTURE = Architecture("ddpm_head", DDPMSegmenterConfig, build_ddpm_segmenter, describe=_describe)
