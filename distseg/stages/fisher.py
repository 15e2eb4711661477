"""The diagonal Fisher of a finished stage's model, saved beside its weights for the next stage's EWC."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from distseg.engine import checkpoint as ckpt
from distseg.losses import compute_fisher, save_fisher


def fisher_for_stage(folder: str | Path, shards: str, split: str, stream_cfg, n_batches: int, *, batch_size: int,
                     device: torch.device | str = "cpu") -> Path:
    """Compute F on ``n_batches`` of the stage's own training data and write ``fisher.safetensors``.

    The model is rebuilt from the exported weights with every parameter trainable, so the Fisher covers the whole
    network even when the stage itself trained only its classifier. The anchor weights θ* are stored with it.
    """
    from distseg.data.stream import build_loader

    folder = Path(folder)
    model, _ = ckpt.load_inference_model(folder, device)
    for p in model.parameters():
        p.requires_grad_(True)
    cfg = dataclasses.replace(stream_cfg, batch_size=batch_size)
    loader = build_loader(shards, split, cfg, rank=0, world_size=1, train=False)
    fisher = compute_fisher(model, iter(loader), n_batches, device, progress=True)
    anchor = {name: p.detach() for name, p in model.named_parameters()}
    path = folder / ckpt.FISHER
    save_fisher(path, fisher, anchor)
    return path
