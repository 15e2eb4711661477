"""Transferability of a candidate: LogME of the target's pixel labels on a candidate-trained model's features.

The features are the segmenter's decoder output (the classifier's input, at stride 4), read at a seeded sample of
labelled positions of each target tile (whole, as training saw it); the label of a position is the mask pixel at
the centre of its cell. Ignored pixels (and edge padding, which masks mark as ignored) are never sampled.
"""
from __future__ import annotations

import numpy as np
import torch

from distseg.analysis.logme import logme
from distseg.analysis.sources import Dataset, read_tiles


def _cell_labels(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """The mask value at the centre of each cell of a height×width grid laid over the mask."""
    ys = np.minimum(((np.arange(height) + 0.5) * mask.shape[0] / height).astype(int), mask.shape[0] - 1)
    xs = np.minimum(((np.arange(width) + 0.5) * mask.shape[1] / width).astype(int), mask.shape[1] - 1)
    return mask[np.ix_(ys, xs)]


@torch.inference_mode()
def pixel_features(model, target: Dataset, ignore_index: int, per_tile: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(features N×D, labels N) at up to ``per_tile`` labelled positions of every sampled target tile."""
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    feats, labels = [], []
    for tile in read_tiles(target, masks=True, whole=True):
        if tile.mask is None:
            continue
        image = torch.from_numpy(np.array(tile.image)).to(device).permute(2, 0, 1)[None].float() / 255
        grid = model.features(image)[0]  # D×h×w
        cells = _cell_labels(tile.mask, *grid.shape[1:]).ravel()
        valid = np.flatnonzero(cells != ignore_index)
        pick = rng.choice(valid, size=min(per_tile, len(valid)), replace=False) if len(valid) else valid
        feats.append(grid.flatten(1)[:, torch.from_numpy(pick).to(device)].T.float().cpu().numpy())
        labels.append(cells[pick])
    if not feats:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return np.concatenate(feats), np.concatenate(labels)


def transferability(stage: str, target: Dataset, ignore_index: int, per_tile: int, seed: int,
                    device: str | torch.device = "cpu") -> tuple[float, int]:
    """(LogME, number of labelled positions) of the target's labels on ``stage``'s model features."""
    from distseg.analysis import GapError
    from distseg.engine.checkpoint import load_inference_model

    model, _ = load_inference_model(stage, device)
    feats, labels = pixel_features(model, target, ignore_index, per_tile, seed)
    if len(labels) < 2:
        raise GapError(f"{target.folder}: too few labelled pixels in split {','.join(target.splits)} for LogME")
    return logme(feats, labels), len(labels)
