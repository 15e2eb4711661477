"""Segmentation models: DeepLabV3+ over registered timm backbones, with Polarized Self-Attention.

``build_model(ModelConfig(...))`` is the entry point; weights I/O lives in ``distseg.models.weights``
and cost measurement (params, MACs/FLOPs, throughput) in ``distseg.models.profile``.
"""
from distseg.models.backbones import BACKBONES, Backbone, BackboneSpec, PretrainedWeightsError, get_spec
from distseg.models.config import ModelConfig
from distseg.models.deeplab import ASPP, DeepLabV3Plus, build_model
from distseg.models.psa import ChannelPSA, PolarizedSelfAttention, SpatialPSA
from distseg.models.weights import LoadReport, WeightsError, load_backbone_weights, load_weights, save_weights

__all__ = [
    "ASPP", "BACKBONES", "Backbone", "BackboneSpec", "ChannelPSA", "DeepLabV3Plus", "LoadReport", "ModelConfig",
    "PolarizedSelfAttention", "PretrainedWeightsError", "SpatialPSA", "WeightsError", "build_model", "get_spec",
    "load_backbone_weights", "load_weights", "save_weights",
]
