"""Segmentation models: DeepLabV3+ over registered timm backbones, with Polarized Self-Attention, and the other
registered architectures (``distseg.models.architectures``: the DDPM denoiser and its feature head).

``build_model(cfg)`` builds any registered architecture's config (``ModelConfig(...)`` is DeepLabV3+); weights I/O
lives in ``distseg.models.weights`` and cost measurement (params, MACs/FLOPs, throughput) in
``distseg.models.profile``.
"""
from distseg.models.backbones import BACKBONES, Backbone, BackboneSpec, PretrainedWeightsError, get_spec
from distseg.models.config import ModelConfig
from distseg.models.architectures import build_model, model_config_from_dict
from distseg.models.deeplab import ASPP, DeepLabV3Plus, build_deeplab
from distseg.models.psa import ChannelPSA, PolarizedSelfAttention, SpatialPSA
from distseg.models.weights import LoadReport, WeightsError, load_backbone_weights, load_weights, save_weights

__all__ = [
    "ASPP", "BACKBONES", "Backbone", "BackboneSpec", "ChannelPSA", "DeepLabV3Plus", "LoadReport", "ModelConfig",
    "PolarizedSelfAttention", "PretrainedWeightsError", "SpatialPSA", "WeightsError", "build_deeplab", "build_model",
    "get_spec", "load_backbone_weights", "load_weights", "model_config_from_dict", "save_weights",
]
