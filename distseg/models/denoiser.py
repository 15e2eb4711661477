"""The DDPM denoiser: diffusers' ``UNet2DModel`` and its ``DDPMScheduler`` noise schedule, as one config.

The noise schedule is part of the model's config, not of the training stage: the features a frozen denoiser gives
at "t = 150" only mean something under the schedule it was trained with, so a stage that extracts features reads
both from the denoiser's own stage folder.

Images are in [0, 1] everywhere in distseg; the denoiser works in [-1, 1] (:func:`to_unet_range`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from distseg.models.architectures import Architecture, InputSizeError


@dataclass
class NoiseSchedule:
    """The forward-noising schedule (a ``DDPMScheduler`` with epsilon prediction)."""

    timesteps: int = 1000
    """Diffusion steps T; features and training use t in [0, T)."""
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    """How the noise variances β_t grow with t (diffusers' names; ``squaredcos_cap_v2`` is the cosine schedule)."""
    beta_start: float = 1e-4
    """β at t = 0 (linear schedules)."""
    beta_end: float = 0.02
    """β at t = T − 1 (linear schedules)."""

    def __post_init__(self) -> None:
        if self.timesteps < 2:
            raise ValueError(f"schedule.timesteps must be >= 2, got {self.timesteps}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")

    def scheduler(self):
        """The diffusers scheduler of this schedule (training noise, feature noise, and sampling's config)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler(num_train_timesteps=self.timesteps, beta_schedule=self.beta_schedule,
                             beta_start=self.beta_start, beta_end=self.beta_end, prediction_type="epsilon",
                             clip_sample=True)


@dataclass
class DenoiserConfig:
    """A ``UNet2DModel`` (one entry of ``channels`` per resolution level) and the schedule it denoises."""

    architecture: Literal["ddpm_unet"] = "ddpm_unet"
    """The entry of ``distseg.models.architectures`` this config builds (recorded in stage.json)."""
    image_size: int = 64
    """Side of the square images the denoiser trains on and samples (its inputs may have any size that divides by
    :attr:`stride`)."""
    channels: tuple[int, ...] = (64, 128, 128, 256)
    """Width of each resolution level, finest first; each level after the first halves the resolution."""
    layers_per_block: int = 2
    """ResNet layers per encoder level (the decoder has one more per level, as in diffusers)."""
    attention: tuple[bool, ...] = (False, False, True, True)
    """Self-attention after each ResNet layer of a level, one flag per level."""
    attention_head_dim: int = 32
    """Channels per attention head."""
    norm_groups: int = 32
    """GroupNorm groups; must divide every level's width."""
    dropout: float = 0.0
    """Dropout inside the ResNet layers."""
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    """The noise schedule the UNet is trained to invert."""

    def __post_init__(self) -> None:
        if self.architecture != "ddpm_unet":
            raise ValueError(f"a DenoiserConfig describes a ddpm_unet model, not {self.architecture!r}")
        self.channels, self.attention = tuple(self.channels), tuple(self.attention)
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive widths, got {list(self.channels)}")
        if len(self.attention) != len(self.channels):
            raise ValueError(f"attention needs one flag per level ({len(self.channels)}), got {len(self.attention)}")
        if self.layers_per_block < 1 or self.norm_groups < 1 or self.attention_head_dim < 1:
            raise ValueError("layers_per_block, norm_groups and attention_head_dim must be >= 1")
        if any(c % self.norm_groups for c in self.channels):
            raise ValueError(f"norm_groups {self.norm_groups} must divide every level's width {list(self.channels)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.check_size(self.image_size, self.image_size, where="image_size")

    @property
    def stride(self) -> int:
        """Total downsampling of the UNet: every input side must be a multiple of it."""
        return 2 ** (len(self.channels) - 1)

    def check_size(self, height: int, width: int, where: str = "input") -> None:
        """Refuse a spatial size this UNet cannot take (its skip connections need sides divisible by the stride)."""
        if height < 1 or width < 1 or height % self.stride or width % self.stride:
            raise InputSizeError(f"{where} {height}×{width}: this UNet ({len(self.channels)} levels) takes sides "
                                 f"that are positive multiples of {self.stride}")


@dataclass(frozen=True)
class DecoderLayer:
    """One decoder layer whose output the feature extractor can hook: what it outputs, and where."""

    index: int
    """Position in decoding order (the number ``extractor.blocks`` uses)."""
    up_block: int
    """Index into ``unet.up_blocks`` (0 = coarsest level)."""
    layer: int
    """ResNet layer within that up block."""
    channels: int
    """Output channels."""
    stride: int
    """Output resolution is input / stride (the layer's level, before that up block's upsampler)."""
    attention: bool
    """Whether the output is taken after the layer's self-attention (levels with attention)."""


def decoder_layers(cfg: DenoiserConfig) -> list[DecoderLayer]:
    """Every hookable decoder layer of the UNet ``cfg`` builds, coarsest first: the documented feature shapes."""
    levels = len(cfg.channels)
    layers = []
    for up_block in range(levels):
        level = levels - 1 - up_block
        for layer in range(cfg.layers_per_block + 1):
            layers.append(DecoderLayer(len(layers), up_block, layer, cfg.channels[level], 2 ** level,
                                       cfg.attention[level]))
    return layers


def layer_module(unet: nn.Module, layer: DecoderLayer) -> nn.Module:
    """The submodule whose forward output is ``layer``'s feature (its attention when it has one, else its ResNet)."""
    block = unet.up_blocks[layer.up_block]
    return block.attentions[layer.layer] if layer.attention else block.resnets[layer.layer]


def build_denoiser(cfg: DenoiserConfig) -> nn.Module:
    """The diffusers ``UNet2DModel`` of ``cfg`` (random weights); ``forward(x_t in [-1, 1], t)``."""
    from diffusers import UNet2DModel

    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention))
    return UNet2DModel(sample_size=cfg.image_size, in_channels=3, out_channels=3, block_out_channels=cfg.channels,
                       layers_per_block=cfg.layers_per_block, down_block_types=down, up_block_types=up,
                       attention_head_dim=cfg.attention_head_dim, norm_num_groups=cfg.norm_groups,
                       dropout=cfg.dropout)


def to_unet_range(images: torch.Tensor) -> torch.Tensor:
    """distseg's [0, 1] images -> the denoiser's [-1, 1]."""
    return images * 2.0 - 1.0


def from_unet_range(samples: torch.Tensor) -> torch.Tensor:
    """The denoiser's [-1, 1] -> [0, 1] images (clamped)."""
    return ((samples + 1.0) / 2.0).clamp(0.0, 1.0)


ARCHITECTURE = Architecture("ddpm_unet", DenoiserConfig, build_denoiser, segmenter=False,
                            describe=lambda cfg: f"ddpm_unet {'-'.join(map(str, cfg.channels))}")


@torch.no_grad()
def draw_samples(unet: torch.nn.Module, scheduler, size: int, count: int, steps: int, seed: int,
                 device: torch.device) -> torch.Tensor:
    """``count`` images in [0, 1] (count×3×size×size) denoised from seeded noise by DDIM (η = 0) over ``steps``
    steps of the training schedule: deterministic, and far fewer steps than ancestral DDPM sampling needs."""
    from diffusers import DDIMScheduler
    from rich.progress import track

    sampler = DDIMScheduler.from_config(scheduler.config)
    sampler.set_timesteps(steps)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(count, 3, size, size, generator=generator).to(device)
    was_training = unet.training
    unet.eval()
    for t in track(sampler.timesteps, description=f"sampling {count} images", transient=True):
        eps = unet(x, t.to(device).expand(count), return_dict=False)[0]
        x = sampler.step(eps, t, x).prev_sample
    unet.train(was_training)
    return from_unet_range(x).cpu()
