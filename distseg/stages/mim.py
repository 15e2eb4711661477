"""Domain-adaptive pretraining by edge-guided masked image modelling (EGMIM), on unlabelled shards only.

The encoder (ImageNet weights, a parent stage's encoder, or random) learns to reconstruct masked patches of the
target domain's own imagery. Edges (Sobel, on the device) guide both which patches are masked and how the
reconstruction error is weighted (:mod:`distseg.ops.masking`); ``edge_weight = 0`` and ``edge_beta = 0`` give plain
random-mask MIM, the ablation. The stage folder's ``model.safetensors`` holds the encoder under the segmenter's
``backbone.*`` keys, so a ``head`` or ``finetune`` stage takes the folder as its parent and builds the DeepLabV3+
head on it. ``reconstructions.png`` beside it shows images, edge maps, masks and reconstructions.

BatchNorm (``bn``): masked inputs would pull running statistics away from real images. ``frozen`` keeps the
encoder's BN layers in eval mode (their statistics fixed, their affine weights trained); ``train`` lets statistics
follow the masked inputs, for a random start that has no statistics worth keeping (the next stage re-estimates
them on clean images). ``auto`` is ``frozen`` for a pretrained or parent encoder, ``train`` for a random one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from distseg.data.batch import Batches
from distseg.engine import checkpoint as ckpt
from distseg.models.mim import EncoderOnly, build_reconstructor
from distseg.models.weights import load_backbone_weights, save_weights
from distseg.ops.masking import (check_patching, edge_map, masked_reconstruction_loss, patch_density,
                                 patch_normalised, pixel_mask, sample_patch_mask)
from distseg.stages.registry import StageKind
from distseg.stages.task import Student, Task

FIGURE = "reconstructions.png"


@dataclass
class MIMOptions:
    """Masking, reconstruction and BatchNorm settings of the ``mim`` stage."""

    mask_ratio: float = 0.6
    """Fraction of each image's patches hidden from the encoder."""
    patch_size: int = 16
    """Side of a mask patch in pixels; must divide the training crop."""
    edge_weight: float = 0.5
    """w in p_i = (1 − w)/N + w · rank_i/Σrank: 0 = uniform random masking, 1 = by edge-density rank alone."""
    edge_beta: float = 1.0
    """β in the per-pixel loss weight 1 + β · edge (0 = the plain loss)."""
    loss: Literal["l1", "l2"] = "l1"
    """Reconstruction error on masked pixels."""
    decoder_width: int = 64
    """Channels of the light decoder."""
    bn: Literal["auto", "frozen", "train"] = "auto"
    """Encoder BatchNorm statistics during masking (see the module docstring)."""
    figure_tiles: int = 4
    """Pool tiles shown in reconstructions.png (0: no figure)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.patch_size < 1 or self.decoder_width < 1 or self.figure_tiles < 0:
            raise ValueError("patch_size and decoder_width must be >= 1 and figure_tiles >= 0")
        if not 0.0 <= self.edge_weight <= 1.0 or self.edge_beta < 0:
            raise ValueError(f"edge_weight must be in [0, 1] and edge_beta >= 0, got {self.edge_weight}, "
                             f"{self.edge_beta}")


class MIMTask(Task):
    """Masked reconstruction of the pool's images; the trained encoder is the export."""

    @classmethod
    def check_config(cls, cfg) -> None:
        crop = cfg.data.stream.augment.crop_size
        check_patching((crop, crop), cfg.options.patch_size, cfg.options.mask_ratio)

    def build(self) -> Student:
        parent, opts = self.ctx.parent, self.options
        model_cfg = parent.model_cfg if parent else self.cfg.model
        start = dataclasses.replace(model_cfg, pretrained=None if parent else self.cfg.model.pretrained)
        model = build_reconstructor(start, opts.decoder_width)
        if parent is not None and parent.weights is not None:
            load_backbone_weights(model.backbone, parent.weights)
        pretrained = parent is not None or start.pretrained is not None
        frozen = opts.bn == "frozen" or (opts.bn == "auto" and pretrained)
        self._frozen_bn = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] \
            if frozen else []
        self._preview: torch.Tensor | None = None
        return Student(model, list(model.parameters()), dataclasses.replace(model_cfg, pretrained=None))

    def masks(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """(edges B×1×H×W, pixel mask B×1×H×W) for a batch, sampled as the options say."""
        opts = self.options
        edges = edge_map(images)
        grid = sample_patch_mask(patch_density(edges, opts.patch_size), opts.mask_ratio, opts.edge_weight, generator)
        return edges, pixel_mask(grid, opts.patch_size)

    def step(self, batches: Batches) -> dict[str, torch.Tensor]:
        for module in self._frozen_bn:  # running statistics stay those of real images
            module.eval()
        images = batches.unlabelled.image
        if self._preview is None:
            self._preview = images[: self.options.figure_tiles].detach().clone()
        edges, mask = self.masks(images)
        with self.autocast:
            pred = self.engine(images, mask)
        target = patch_normalised(images, self.options.patch_size)
        loss = masked_reconstruction_loss(pred, target, mask, edges, beta=self.options.edge_beta,
                                          kind=self.options.loss)
        # how much more edge the masked pixels hold than the average pixel (1 = no edge preference)
        edge_share = (edges * mask).sum() / mask.sum().clamp_min(1) / edges.mean().clamp_min(1e-6)
        return {"loss": loss, "rec": loss.detach(), "masked_edge_ratio": edge_share.detach()}

    def export(self, folder: Path) -> None:
        """The encoder alone (``backbone.*`` keys), and the reconstruction figure."""
        folder.mkdir(parents=True, exist_ok=True)
        save_weights(EncoderOnly(self.student.backbone), folder / ckpt.WEIGHTS, {"kind": "mim-encoder"})
        if self._preview is not None and self.options.figure_tiles:
            write_figure(self, self._preview, folder / FIGURE)


@torch.no_grad()
def write_figure(task: MIMTask, images: torch.Tensor, path: Path) -> Path:
    """Rows of image | edges | mask | masked input | reconstruction (the target's patch statistics put back)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, p = task.student, task.options.patch_size
    edges, mask = task.masks(images, torch.Generator(device=images.device).manual_seed(0))
    was_training = model.training
    model.eval()
    pred = model(images, mask)
    model.train(was_training)
    shown = _unnormalise(pred, images, p) * mask + images * (1 - mask)
    columns = [("image", images), ("edges", edges.expand_as(images)), ("mask", mask.expand_as(images)),
               ("masked input", images * (1 - mask)), ("reconstruction", shown)]
    fig, axes = plt.subplots(len(images), len(columns), figsize=(2.2 * len(columns), 2.2 * len(images)),
                             squeeze=False)
    for row in range(len(images)):
        for col, (title, tensor) in enumerate(columns):
            ax = axes[row][col]
            ax.imshow(tensor[row].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _unnormalise(pred: torch.Tensor, images: torch.Tensor, patch: int) -> torch.Tensor:
    """Map patch-normalised predictions back to pixels with each patch's true mean and std (for display only)."""
    import torch.nn.functional as F

    b, c, h, w = images.shape
    patches = F.unfold(images.float(), patch, stride=patch)
    mean, std = patches.mean(1, keepdim=True), patches.std(1, keepdim=True, unbiased=False)
    pred_patches = F.unfold(pred.float(), patch, stride=patch)
    return F.fold(pred_patches * std + mean, (h, w), patch, stride=patch)


KIND = StageKind("mim", MIMTask, MIMOptions, parent="optional", labelled=False, unlabelled=True,
                 random_start=True, script="pretrain_mim.py",
                 summary="domain-adaptive pretraining: edge-guided masked image modelling on unlabelled shards")
