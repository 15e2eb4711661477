"""Polarized Self-Attention (Liu et al., 2021), written from the formulas of SPEC §2.

Both branches keep full resolution along the dimension they do not collapse ("polarized"): the channel
branch collapses space to weight channels, the spatial branch collapses channels to weight positions.
Each branch exposes ``weights(x)`` (values in (0, 1)) so they can be inspected and tested directly.
"""
from __future__ import annotations

import torch
from torch import nn


class ChannelPSA(nn.Module):
    """Channel-only branch: a (B, C, 1, 1) weight from a softmax-over-positions query.

    q = 1×1 conv C→1 with a softmax over the H·W positions; v = 1×1 conv C→C/2. Their product is a
    C/2 vector, lifted by a 1×1 conv C/2→C, then LayerNorm and sigmoid.
    """

    def __init__(self, channels: int):
        super().__init__()
        hidden = channels // 2
        self.query = nn.Conv2d(channels, 1, 1, bias=False)  # a bias would cancel in the softmax
        self.value = nn.Conv2d(channels, hidden, 1)
        self.up = nn.Conv2d(hidden, channels, 1)
        self.norm = nn.LayerNorm(channels)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel weights in (0, 1), shape (B, C, 1, 1)."""
        b, c = x.shape[:2]
        q = self.query(x).flatten(2).softmax(dim=-1)  # B×1×HW
        v = self.value(x).flatten(2)  # B×C/2×HW
        z = torch.bmm(v, q.transpose(1, 2)).unsqueeze(-1)  # B×C/2×1×1
        z = self.up(z).flatten(1)  # B×C
        return torch.sigmoid(self.norm(z)).view(b, c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weights(x)


class SpatialPSA(nn.Module):
    """Spatial-only branch: a (B, 1, H, W) weight from a softmax-over-channels query.

    q = 1×1 conv C→C/2, global average pool, softmax over channels; v = 1×1 conv C→C/2. Their product is
    an H×W map, then sigmoid. The pool is applied *before* the query conv: a 1×1 conv is affine, so this
    equals conv-then-pool exactly while costing C·C/2 instead of C·C/2·H·W multiply-adds.
    """

    def __init__(self, channels: int):
        super().__init__()
        hidden = channels // 2
        self.query = nn.Conv2d(channels, hidden, 1)
        self.value = nn.Conv2d(channels, hidden, 1)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-position weights in (0, 1), shape (B, 1, H, W)."""
        b, _, h, w = x.shape
        q = self.query(x.mean(dim=(2, 3), keepdim=True)).flatten(1).softmax(dim=-1)  # B×C/2
        v = self.value(x).flatten(2)  # B×C/2×HW
        s = torch.bmm(q.unsqueeze(1), v)  # B×1×HW
        return torch.sigmoid(s).view(b, 1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weights(x)


class PolarizedSelfAttention(nn.Module):
    """PSA block; ``layout`` is ``parallel`` (x·ch + x·sp) or ``sequential`` (sp(ch(x)))."""

    def __init__(self, channels: int, layout: str = "parallel"):
        super().__init__()
        if layout not in ("parallel", "sequential"):
            raise ValueError(f"PSA layout must be parallel or sequential, got {layout!r}")
        if channels < 2:
            raise ValueError(f"PSA needs at least 2 channels (it halves them), got {channels}")
        self.layout = layout
        self.channel = ChannelPSA(channels)
        self.spatial = SpatialPSA(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "sequential":
            return self.spatial(self.channel(x))
        # x·ch + x·sp written as x·(ch + sp): one full-size product instead of two, plus one add.
        return x * (self.channel.weights(x) + self.spatial.weights(x))

    def extra_repr(self) -> str:
        return f"layout={self.layout}"
