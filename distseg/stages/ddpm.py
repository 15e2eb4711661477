"""Pretrain a DDPM denoiser on the unlabelled pool: the feature extractor of the ``ddpm_head`` kind.

Per micro-step: the pool's crops (resized to ``denoiser.image_size`` when the loader's crop differs) are mapped to
[-1, 1], noised at uniformly drawn steps t by the schedule's ``DDPMScheduler``, and the UNet (diffusers'
``UNet2DModel``, inside the DeepSpeed engine) predicts the noise; the loss is the mean squared error. An EMA of the
weights (declared on the stage state, as the ssl kind's teacher) is what the stage exports and samples from.

The stage folder holds ``model.safetensors`` (the EMA weights, or the trained ones without EMA),
``student.safetensors`` (the trained weights, when an EMA is exported), ``stage.json`` whose ``config.model`` is the
denoiser's config (UNet and noise schedule, architecture ``ddpm_unet``), and ``samples.png``: a grid drawn from the
exported weights so a user can see whether the model learned the domain.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from distseg.data.batch import Batches
from distseg.data.imageio import write_grid_png
from distseg.engine.state import EMAOptions
from distseg.models.denoiser import DenoiserConfig, build_denoiser, draw_samples, to_unet_range
from distseg.stages.registry import StageKind
from distseg.stages.task import Student, Task

SAMPLES = "samples.png"
_RANK_SEED_STRIDE = 1_000_003
"""Offset of each rank's noise stream (so ranks draw different noise and steps for their different images)."""


@dataclass
class DDPMOptions:
    """The denoiser to train (UNet, image size, noise schedule), its weight EMA, and the sample grid."""

    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    """UNet levels and widths, layers per level, attention, image size and noise schedule (timesteps, betas)."""
    ema: EMAOptions | None = field(default_factory=lambda: EMAOptions(alpha=0.999, warmup_steps=1000))
    """The exported weights: an EMA of the trained ones (alpha, warmup_steps); null exports the trained weights."""
    samples: int = 16
    """Images in ``samples.png`` (0: no grid)."""
    sample_steps: int = 50
    """Denoising steps per sample (DDIM over the same schedule, deterministic from ``sample_seed``)."""
    sample_seed: int = 0
    """Seed of the samples' starting noise."""

    def __post_init__(self) -> None:
        if self.samples < 0:
            raise ValueError(f"samples must be >= 0, got {self.samples}")
        if not 1 <= self.sample_steps <= self.denoiser.schedule.timesteps:
            raise ValueError(f"sample_steps must be in [1, {self.denoiser.schedule.timesteps}], got "
                             f"{self.sample_steps}")


class DDPMTask(Task):
    """The UNet in the engine learns to predict the noise; an EMA copy beside it is exported and sampled."""

    def build(self) -> Student:
        cfg = self.options.denoiser
        unet = build_denoiser(cfg)
        self.scheduler = cfg.schedule.scheduler()
        if self.options.ema is not None:
            self.state.ema("ema", unet, self.options.ema, deploy=True)
        return Student(unet, list(unet.parameters()), cfg)

    def bind(self, engine, autocast=None) -> None:
        super().bind(engine, autocast)
        # The weights are identical on every rank by now; from here each rank draws its own noise and steps.
        torch.manual_seed(self.cfg.train.seed + _RANK_SEED_STRIDE * self.env.rank)

    def streams(self) -> tuple[str, ...]:
        return ("unlabelled",)

    def step(self, batches: Batches) -> dict[str, torch.Tensor]:
        images = batches.unlabelled.image
        size = self.options.denoiser.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x0 = to_unet_range(images)
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        x_t = self.scheduler.add_noise(x0, noise, t)
        with self.autocast:
            predicted = self.engine(x_t, t, return_dict=False)[0]
        mse = F.mse_loss(predicted.float(), noise)
        return {"loss": mse, "mse": mse.detach()}

    def finish(self, folder: Path) -> None:
        """Rank 0 draws the sample grid from the exported weights."""
        if self.env.is_main and self.options.samples:
            grid = draw_samples(self.state.deployed_module, self.scheduler, self.options.denoiser.image_size,
                                self.options.samples, self.options.sample_steps, self.options.sample_seed, self.env.device)
            write_grid_png(grid, folder / SAMPLES)

    def record(self) -> dict[str, Any]:
        return {"samples": SAMPLES if self.options.samples else None}


KIND = StageKind("ddpm", DDPMTask, DDPMOptions, parent="none", labelled=False, unlabelled=True, script="ddpm.py",
                 summary="pretrain a DDPM denoiser (diffusers UNet2DModel) on the unlabelled pool")
