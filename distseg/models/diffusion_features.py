"""Per-pixel features from a frozen DDPM denoiser, computed per batch on the device (no feature cache).

For each chosen noise level t, the image is noised with a fixed, seeded noise (x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, by the
denoiser's own ``DDPMScheduler``), the UNet runs once, and forward hooks collect the chosen decoder layers
(:func:`distseg.models.denoiser.decoder_layers` documents their shapes). Each map is upsampled bilinearly to
input / ``feature_stride`` and everything is concatenated along channels, t-major:
``[t0: layer a, layer b, ..., t1: layer a, ...]``.

Differences from the reference implementation (yandex-research/ddpm-segmentation), which caches every pixel's
features in RAM beforehand (about 210 GB for 50 images at 256²) and is written for one input size:

- features exist for one batch at a time, on the device, and are freed after the head's forward;
- any input whose sides divide by the UNet's stride works, since the UNet is fully convolutional and the fixed noise
  is drawn for each input size from the same seed;
- the UNet stops once the deepest chosen layer has run (the finer decoder levels are skipped when unused);
- the same noise is used for every image of a batch, so an image's features do not depend on its batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distseg.models.denoiser import DenoiserConfig, build_denoiser, decoder_layers, layer_module, to_unet_range

_NOISE_CACHE = 8
"""Noise tensors kept per extractor (one per input size and device in use; evaluation, training and sliding windows
need one or two)."""


@dataclass
class ExtractorConfig:
    """Which noise levels and decoder layers become features, and at what resolution."""

    timesteps: tuple[int, ...] = (50, 150, 250)
    """Noise levels t (each in [0, T) of the denoiser's schedule); one UNet forward per t."""
    blocks: tuple[int, ...] = (3, 4, 5, 6, 7)
    """Decoder layers to collect, by index in decoding order (coarsest first; see ``decoder_layers``)."""
    noise_seed: int = 0
    """Seed of the fixed noise ε: the same seed gives the same features."""
    feature_stride: int = 1
    """Features (and the head) live at input / this resolution; logits are upsampled to the input size. 1 is the
    paper's per-pixel setting; 2 or 4 cut the head's memory and compute by 4× or 16×."""

    def __post_init__(self) -> None:
        self.timesteps, self.blocks = tuple(self.timesteps), tuple(self.blocks)
        if not self.timesteps or min(self.timesteps) < 0 or len(set(self.timesteps)) != len(self.timesteps):
            raise ValueError(f"extractor.timesteps must be distinct non-negative steps, got {list(self.timesteps)}")
        if not self.blocks or min(self.blocks) < 0 or len(set(self.blocks)) != len(self.blocks):
            raise ValueError(f"extractor.blocks must be distinct non-negative layer indices, got {list(self.blocks)}")
        if self.feature_stride < 1 or self.feature_stride & (self.feature_stride - 1):
            raise ValueError(f"extractor.feature_stride must be a power of two >= 1, got {self.feature_stride}")

    def check(self, denoiser: DenoiserConfig) -> None:
        """Refuse steps outside the denoiser's schedule and layers it does not have."""
        steps = denoiser.schedule.timesteps
        outside = [t for t in self.timesteps if t >= steps]
        if outside:
            raise ValueError(f"extractor.timesteps {outside} are outside the denoiser's schedule (t in [0, {steps}))")
        layers = len(decoder_layers(denoiser))
        unknown = [b for b in self.blocks if b >= layers]
        if unknown:
            raise ValueError(f"extractor.blocks {unknown}: unknown decoder block(s); this UNet has {layers} "
                             f"(0-{layers - 1}, coarsest first)")
        if self.feature_stride > denoiser.stride:
            raise ValueError(f"extractor.feature_stride {self.feature_stride} exceeds the UNet's stride "
                             f"{denoiser.stride}")


class _Collected(Exception):
    """Raised by the hook of the deepest chosen layer: the rest of the UNet's forward is not needed."""


class DiffusionFeatures(nn.Module):
    """Frozen UNet + hooks: images in [0, 1] (B×3×H×W) -> features B×:attr:`channels`×H/s×W/s."""

    def __init__(self, denoiser: DenoiserConfig, cfg: ExtractorConfig) -> None:
        super().__init__()
        cfg.check(denoiser)
        self.denoiser, self.cfg = denoiser, cfg
        self.unet = build_denoiser(denoiser)
        self.scheduler = denoiser.schedule.scheduler()
        table = decoder_layers(denoiser)
        self.layers = [table[i] for i in cfg.blocks]
        self.frozen = True
        """Features are computed without autograd (the paper's setting); ``False`` lets gradients reach the UNet."""
        self._store: dict[int, torch.Tensor] = {}
        self._noise: dict[tuple, torch.Tensor] = {}
        last = max(layer.index for layer in self.layers)
        for layer in self.layers:
            layer_module(self.unet, layer).register_forward_hook(self._hook(layer.index, stop=layer.index == last))

    @property
    def channels(self) -> int:
        """Feature channels: the chosen layers' widths, once per noise level."""
        return sum(layer.channels for layer in self.layers) * len(self.cfg.timesteps)

    def _hook(self, index: int, stop: bool):
        """A forward hook that keeps layer ``index``'s output (and ends the forward after the deepest one)."""
        def hook(module: nn.Module, inputs, output) -> None:
            self._store[index] = output[0] if isinstance(output, tuple) else output
            if stop:
                raise _Collected
        return hook

    def fixed_noise(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """ε for inputs of this size: 1×3×H×W drawn on the CPU from ``noise_seed`` (identical on every device), moved
        once and kept, so the training step does no host-to-device copy after the first batch."""
        key = (height, width, str(device))
        if key not in self._noise:
            generator = torch.Generator(device="cpu").manual_seed(self.cfg.noise_seed)
            noise = torch.randn(1, 3, height, width, generator=generator, device="cpu")
            if len(self._noise) >= _NOISE_CACHE:
                self._noise.pop(next(iter(self._noise)))
            self._noise[key] = noise.to(device)
        return self._noise[key]

    def collect(self, x_t: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        """Run the UNet on ``x_t`` at step ``t`` and return the chosen layers' outputs, in ``blocks`` order."""
        self._store.clear()
        try:
            self.unet(x_t, t, return_dict=False)
        except _Collected:
            pass
        maps = [self._store.pop(layer.index) for layer in self.layers]
        self._store.clear()
        return maps

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        self.denoiser.check_size(h, w)
        size = (h // self.cfg.feature_stride, w // self.cfg.feature_stride)
        x0 = to_unet_range(images)
        noise = self.fixed_noise(h, w, images.device).to(x0.dtype).expand_as(x0)
        features = []
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            for step in self.cfg.timesteps:
                t = torch.full((b,), step, dtype=torch.long, device=images.device)
                x_t = self.scheduler.add_noise(x0, noise, t)
                for fmap in self.collect(x_t, t):
                    if fmap.shape[-2:] != size:
                        fmap = F.interpolate(fmap, size=size, mode="bilinear", align_corners=False)
                    features.append(fmap)
        return torch.cat(features, dim=1)
