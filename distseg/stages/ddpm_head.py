"""Train a residual MLP head on frozen DDPM features (Luo et al. 2025) on the labelled shards.

The parent is a finished ``ddpm`` stage: its ``config.model`` (the UNet and noise schedule) and its exported weights.
The student is one :class:`~distseg.models.ddpm_head.DDPMSegmenter`: features are extracted per batch on the device
(fixed seeded noise at each chosen t, hooks on the chosen decoder layers, upsampled and concatenated) and the head
classifies every pixel; the loss is the stage's supervised loss (CE or OHEM). Only the head is optimised unless
``train_extractor`` unfreezes the UNet (the ablation). ``random_extractor`` replaces the parent's weights with a fresh
initialisation of the same UNet: the control that says whether pretraining matters.

The exported ``model.safetensors`` holds the UNet and the head, and ``config.model`` (architecture ``ddpm_head``)
rebuilds both, so ``evaluate``, ``predict`` and ``bench infer`` read the folder like any other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from distseg.data.batch import Batches
from distseg.data.manifest import read_manifest
from distseg.models.architectures import InputSizeError
from distseg.models.ddpm_head import DDPMSegmenter, DDPMSegmenterConfig
from distseg.models.denoiser import DenoiserConfig
from distseg.models.diffusion_features import ExtractorConfig
from distseg.models.mlp_head import HeadConfig
from distseg.models.weights import load_weights
from distseg.stages.common import Parent, StageError
from distseg.stages.registry import StageKind
from distseg.stages.task import Student, Task, labelled


@dataclass
class DDPMHeadOptions:
    """Which DDPM features, which head, and what trains."""

    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    """Noise levels t, decoder blocks, noise seed and feature resolution."""
    head: HeadConfig = field(default_factory=HeadConfig)
    """Width and depth of the residual MLP head."""
    train_extractor: bool = False
    """Also train the UNet (the ablation); by default it is frozen and gets no gradients."""
    random_extractor: bool = False
    """Use a freshly initialised UNet of the parent's architecture instead of its trained weights (the control)."""


def denoiser_parent(parent: Parent | None) -> Parent:
    """The parent when it is a finished ddpm stage (a denoiser with its weights), else a clear error."""
    if parent is None or not isinstance(parent.model_cfg, DenoiserConfig):
        where = (parent.folder or parent.weights) if parent else "(none)"
        what = parent.model_cfg.architecture if parent and parent.folder else "not a stage folder"
        raise StageError(f"{where}: a ddpm_head stage needs a finished ddpm stage folder as its parent ({what})")
    return parent


def check_sizes(denoiser: DenoiserConfig, cfg) -> None:
    """Refuse training crops and shard tiles the UNet cannot take before training starts, not at the first
    validation (shards cut without ``--tile`` keep their images' own sizes and are checked when they are read)."""
    sides = [("data.stream.augment.crop_size", cfg.data.stream.augment.crop_size)]
    if cfg.data.shards:
        sides.append((f"{cfg.data.shards}: tile", read_manifest(cfg.data.shards)["options"].get("tile")))
    for where, side in sides:
        if side:
            try:
                denoiser.check_size(side, side, where)
            except InputSizeError as exc:
                raise StageError(str(exc)) from None


class DDPMHeadTask(Task):
    """A DDPMSegmenter in the engine; only its head's parameters are optimised unless the extractor is unfrozen."""

    def build(self) -> Student:
        parent, opts = denoiser_parent(self.ctx.parent), self.options
        try:
            cfg = DDPMSegmenterConfig(denoiser=parent.model_cfg, extractor=opts.extractor, head=opts.head,
                                      num_classes=self.class_map.num_classes)
        except ValueError as exc:
            raise StageError(f"{parent.folder}: {exc}") from None
        check_sizes(parent.model_cfg, self.cfg)
        model = DDPMSegmenter(cfg)
        if not opts.random_extractor:
            load_weights(model.features.unet, parent.weights, strict=True)
        model.freeze_extractor(not opts.train_extractor)
        params = list(model.parameters()) if opts.train_extractor else list(model.head.parameters())
        return Student(model, params, cfg)

    def step(self, batches: Batches) -> dict[str, torch.Tensor]:
        return self.supervised(labelled(batches))[1]

    def record(self) -> dict[str, Any]:
        """The feature tensor one training crop produces: what a batch costs beyond the UNet's own activations."""
        features = self.student.features
        crop = self.cfg.data.stream.augment.crop_size // features.cfg.feature_stride
        return {"features": {"channels": features.channels, "size": [crop, crop],
                             "bytes_per_image_fp32": features.channels * crop * crop * 4}}


KIND = StageKind("ddpm_head", DDPMHeadTask, DDPMHeadOptions, parent="required", changes_classes=True,
                 script="ddpm_head.py",
                 summary="a residual MLP head on frozen DDPM decoder features (parent: a ddpm stage)")
