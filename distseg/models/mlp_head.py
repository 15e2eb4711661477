"""The residual MLP head over per-pixel features: 1×1 convs only, so each pixel's logits depend on its own features.

Diffusion features are wide (hundreds to thousands of channels: several decoder layers at several noise levels) and
redundant (neighbouring noise levels and layers carry much the same signal). The head therefore gates channels:
a :class:`ChannelGate` computes a sigmoid weight per channel from the pixel's own features and multiplies it in, on
the raw input (to suppress redundant feature channels before the projection) and inside every residual block. It is
a squeeze-and-excitation whose "squeeze" is the pixel itself rather than a global pool, which keeps the head strictly
per-pixel (a prediction does not depend on the rest of the window, so sliding-window inference is consistent).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class HeadConfig:
    """Width and depth of the residual MLP head."""

    hidden: int = 256
    """Channels of the projected features and of every residual block."""
    blocks: int = 2
    """Gated residual blocks after the projection."""
    gate_reduction: int = 4
    """Bottleneck of every channel gate: hidden / this channels."""
    dropout: float = 0.1
    """Dropout before the classifier (0 disables it)."""

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.blocks < 0 or self.gate_reduction < 1:
            raise ValueError("head.hidden and head.gate_reduction must be >= 1 and head.blocks >= 0")
        if self.hidden // self.gate_reduction < 1:
            raise ValueError(f"head.gate_reduction {self.gate_reduction} leaves no gate width at hidden {self.hidden}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"head.dropout must be in [0, 1), got {self.dropout}")


def pointwise(cin: int, cout: int) -> nn.Sequential:
    """A per-pixel linear layer (1×1 conv, no bias: BN follows) + BatchNorm."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))


class ChannelGate(nn.Module):
    """x · σ(W₂ ReLU(W₁ x)): per-pixel, per-channel weights in (0, 1) that can switch redundant channels off."""

    def __init__(self, channels: int, bottleneck: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(channels, bottleneck, 1)
        self.excite = nn.Conv2d(bottleneck, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.excite(torch.relu(self.squeeze(x))))


class GatedResidualBlock(nn.Module):
    """x + gate(MLP(x)), then ReLU: a two-layer per-pixel MLP whose output channels are reweighted before the sum."""

    def __init__(self, channels: int, bottleneck: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(pointwise(channels, channels), nn.ReLU(inplace=True), pointwise(channels, channels))
        self.gate = ChannelGate(channels, bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.gate(self.mlp(x)))


class ResidualMLPHead(nn.Module):
    """Features B×C×h×w -> logits B×classes×h×w: normalise and gate the input, project, residual blocks, classify.

    Submodules: ``input_norm`` (BatchNorm: the layers' activations have very different scales), ``input_gate``,
    ``project``, ``blocks``, ``dropout`` and ``classifier`` (the final 1×1 conv).
    """

    def __init__(self, in_channels: int, num_classes: int, cfg: HeadConfig) -> None:
        super().__init__()
        bottleneck = cfg.hidden // cfg.gate_reduction
        self.input_norm = nn.BatchNorm2d(in_channels)
        self.input_gate = ChannelGate(in_channels, bottleneck)
        self.project = nn.Sequential(pointwise(in_channels, cfg.hidden), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(*[GatedResidualBlock(cfg.hidden, bottleneck) for _ in range(cfg.blocks)])
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.classifier = nn.Conv2d(cfg.hidden, num_classes, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.project(self.input_gate(self.input_norm(features)))
        return self.classifier(self.dropout(self.blocks(x)))
