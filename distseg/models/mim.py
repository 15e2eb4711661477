"""The masked-image-modelling network: a registry encoder, a learned mask token at the input, a light decoder.

How masking enters a CNN (SimMIM-style, at the input): the image is normalised as the segmenter normalises it, then
every masked patch is replaced by one learned 3-vector (the mask token). The encoder is the exact ``Backbone`` the
DeepLabV3+ head later sits on, so its weights transfer key for key. The decoder is deliberately light (the
encoder must do the work): a 1×1 projection of the deepest feature, upsampled to stride 4 and joined with the
stride-4 feature, one 3×3 conv, and a 1×1 conv to 4·4·3 values per position unshuffled to full resolution.

Dense masking would pull BatchNorm running statistics toward mask-token images; see ``MIMOptions.bn`` in the stage
for how that is handled.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distseg.models.backbones import Backbone, create_backbone
from distseg.models.config import ModelConfig
from distseg.models.deeplab import conv_bn_relu


class MaskedReconstructor(nn.Module):
    """images in [0, 1] and a B×1×H×W mask (1 = hidden) -> predicted patch-normalised pixels B×3×H×W."""

    def __init__(self, backbone: Backbone, width: int = 64) -> None:
        super().__init__()
        self.backbone = backbone
        mean = backbone.pretrained_cfg.get("mean", (0.485, 0.456, 0.406))
        std = backbone.pretrained_cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.high_proj = conv_bn_relu(backbone.high_channels, width, 1)
        self.low_proj = conv_bn_relu(backbone.low_channels, width, 1)
        self.fuse = conv_bn_relu(2 * width, width, 3)
        self.to_pixels = nn.Conv2d(width, 3 * 4 * 4, 1)

    def encoder_input(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The normalised image with every masked pixel set to the mask token."""
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return torch.lerp(x, self.mask_token.to(x.dtype).expand_as(x), mask.to(x.dtype))

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        low, high = self.backbone(self.encoder_input(images, mask))
        high = F.interpolate(self.high_proj(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.fuse(torch.cat([high, self.low_proj(low)], dim=1))
        out = F.pixel_shuffle(self.to_pixels(y), 4)
        if out.shape[-2:] != images.shape[-2:]:
            out = F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return out


def build_reconstructor(cfg: ModelConfig, width: int = 64) -> MaskedReconstructor:
    """The encoder of ``cfg`` (ImageNet or local weights as ``cfg.pretrained`` says) with a fresh decoder."""
    return MaskedReconstructor(create_backbone(cfg), width)


class EncoderOnly(nn.Module):
    """Holds only ``backbone``, so its state dict has the segmenter's ``backbone.*`` keys: what a ``mim`` stage
    exports and a ``head`` or ``finetune`` stage loads (the head's own layers start fresh)."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
