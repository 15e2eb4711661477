"""DeepLabV3+ head over a registered backbone, with optional PSA: the ``deeplabv3plus`` architecture."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from distseg.models.architectures import Architecture
from distseg.models.backbones import Backbone, create_backbone
from distseg.models.config import ModelConfig
from distseg.models.psa import PolarizedSelfAttention


def conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias, BN follows) + BatchNorm + ReLU, padded to keep the spatial size."""
    pad = dilation * (kernel - 1) // 2
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1×1 branch, one 3×3 atrous branch per rate, image pooling,
    then a 1×1 projection.

    The pooling branch has no BatchNorm: its input is one value per channel, so BN would fail to
    train at batch size 1 (and per-GPU micro-batches are often 1-2 at 512²).
    """

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...], dropout: float):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(cin, cout, 1)] +
                                      [conv_bn_relu(cin, cout, 3, dilation=r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True))
        self.project = nn.Sequential(conv_bn_relu(cout * (len(rates) + 2), cout, 1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        outs.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, dim=1))


class DeepLabV3Plus(nn.Module):
    """Segmenter: images in [0, 1] (B×3×H×W) → logits (B×C×H×W) at the input size.

    The first op normalises with the backbone's pretrained mean/std (non-persistent buffers, so they
    are not in the state dict). Submodules: ``backbone``, ``psa`` (Identity when disabled), ``aspp``,
    ``low_proj``, ``decoder`` and ``classifier`` (the final 1×1 conv).
    """

    def __init__(self, cfg: ModelConfig, backbone: Backbone):
        super().__init__()
        self.config = cfg
        mean = backbone.pretrained_cfg.get("mean", (0.485, 0.456, 0.406))
        std = backbone.pretrained_cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.backbone = backbone
        psa_width = {"pre_aspp": backbone.high_channels, "post_aspp": cfg.aspp_channels,
                     "decoder": cfg.decoder_channels}[cfg.psa_position]
        self.psa = nn.Identity() if cfg.psa == "none" else PolarizedSelfAttention(psa_width, cfg.psa)
        self.aspp = ASPP(backbone.high_channels, cfg.aspp_channels, cfg.aspp_rates, cfg.dropout)
        self.low_proj = conv_bn_relu(backbone.low_channels, cfg.low_level_channels, 1)
        self.decoder = nn.Sequential(
            conv_bn_relu(cfg.aspp_channels + cfg.low_level_channels, cfg.decoder_channels, 3),
            conv_bn_relu(cfg.decoder_channels, cfg.decoder_channels, 3))
        self.classifier = nn.Conv2d(cfg.decoder_channels, cfg.num_classes, 1)

    def _psa_at(self, position: str, x: torch.Tensor) -> torch.Tensor:
        """Apply PSA if it is configured at ``position``."""
        return self.psa(x) if self.config.psa_position == position else x

    def features(self, images: torch.Tensor, feature_dropout: float = 0.0) -> torch.Tensor:
        """Decoder output (B×decoder_channels×H/4×W/4), the classifier's input.

        ``feature_dropout`` drops whole channels of both encoder features before the head (UniMatch's feature
        perturbation; the SSL stage uses it on the weak view), whatever the module's mode.
        """
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        low, high = self.backbone(x)
        if feature_dropout > 0:
            low, high = F.dropout2d(low, feature_dropout, True), F.dropout2d(high, feature_dropout, True)
        y = self._psa_at("post_aspp", self.aspp(self._psa_at("pre_aspp", high)))
        if y.shape[-2:] != low.shape[-2:]:
            y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.decoder(torch.cat([y, self.low_proj(low)], dim=1))
        return self._psa_at("decoder", y)

    def forward(self, images: torch.Tensor, feature_dropout: float = 0.0) -> torch.Tensor:
        logits = self.classifier(self.features(images, feature_dropout))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def replace_classifier(self, num_classes: int) -> None:
        """New randomly initialised classifier for ``num_classes``; every other weight is kept."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        old = self.classifier
        self.classifier = nn.Conv2d(old.in_channels, num_classes, 1).to(device=old.weight.device,
                                                                         dtype=old.weight.dtype)
        self.config = dataclasses.replace(self.config, num_classes=num_classes)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters split as ``backbone``, ``head`` (PSA, ASPP, decoder) and ``classifier``.

        Stage A trains ``classifier`` (optionally with ``head``) while the rest stays frozen.
        """
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "head": [], "classifier": []}
        for name, param in self.named_parameters():
            prefix = name.split(".", 1)[0]
            groups[prefix if prefix in ("backbone", "classifier") else "head"].append(param)
        return groups


def build_deeplab(cfg: ModelConfig) -> DeepLabV3Plus:
    """Build the segmenter described by ``cfg`` (weights loaded as ``cfg.pretrained`` says).

    Works under ``torch.device("meta")`` for shape and FLOP checks without allocating weights
    (then leave ``pretrained`` unset).
    """
    return DeepLabV3Plus(cfg, create_backbone(cfg))


ARCHITECTURE = Architecture("deeplabv3plus", ModelConfig, build_deeplab,
                            describe=lambda cfg: cfg.backbone)
