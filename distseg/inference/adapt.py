"""``predict --adapt-bn``: AdaBN on the imagery being mapped, before its first window is predicted.

A model trained on labels from one place normalises the imagery of another with statistics it never saw there
(:mod:`distseg.ops.adabn`); the inputs of a prediction job are exactly that imagery. So the model first runs over
them once in BatchNorm's training mode, without gradients, and then predicts with their statistics:

- the inputs are cut into non-overlapping windows of the job's window size, so the statistics come from the scale
  and context the model predicts at;
- a window with any nodata pixel is left out (the fill value is not imagery);
- windows of the same shape are batched across files, so a folder of small chips adapts like one large raster;
- under a multi-rank launch each rank reads every ``world_size``-th window and the statistics are averaged over
  ranks, so all ranks predict with the same model.

It costs one forward pass per window without overlap or flips: less than the prediction itself.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from distseg.inference.config import PredictConfig
from distseg.inference.errors import PredictError
from distseg.inference.raster import gdal_env, open_reader
from distseg.inference.sliding import WindowPlan, mirror_pad
from distseg.inference.windows import window_starts


class Window(NamedTuple):
    """One adaptation window of one input."""

    path: Path
    y: int
    x: int
    h: int
    w: int


def plan_windows(files: Sequence[Path], cfg: PredictConfig) -> list[Window]:
    """Every input's non-overlapping windows at the job's window size, file by file, top to bottom."""
    windows = []
    for path in files:
        with gdal_env(path, cfg.gdal_cache_mb):
            reader = open_reader(path, cfg.bands, cfg.scale, cfg.max_pixels)
            height, width = reader.height, reader.width
            reader.close()
        plan = WindowPlan.build(height, width, cfg)
        windows += [Window(path, y, x, plan.win_h, plan.win_w)
                    for y in window_starts(height, plan.win_h, 0) for x in window_starts(width, plan.win_w, 0)]
    return windows


def window_batches(windows: Sequence[Window], cfg: PredictConfig, device: torch.device,
                   on_window: Callable[[int], None] | None = None) -> Iterator[torch.Tensor]:
    """Batches (B×3×H×W floats in [0, 1]) of the fully valid ``windows``, grouped by shape across files."""
    pending: dict[tuple[int, int], list[np.ndarray]] = {}
    size = max(2, cfg.batch_size)
    for path, group in _by_file(windows):
        with gdal_env(path, cfg.gdal_cache_mb):
            reader = open_reader(path, cfg.bands, cfg.scale, cfg.max_pixels)
            try:
                for win in group:
                    hh, ww = min(win.h, reader.height - win.y), min(win.w, reader.width - win.x)
                    if reader.read_valid(win.y, win.x, hh, ww).all():
                        pixels = mirror_pad(reader.read(win.y, win.x, hh, ww), win.h, win.w)
                        batch = pending.setdefault((win.h, win.w), [])
                        batch.append(pixels.astype(np.float32) / reader.scale)
                        if len(batch) == size:
                            yield _tensor(pending.pop((win.h, win.w)), device)
                    if on_window is not None:
                        on_window(1)
            finally:
                reader.close()
    for rest in pending.values():
        yield _tensor(rest, device)


def _by_file(windows: Sequence[Window]) -> Iterator[tuple[Path, list[Window]]]:
    """Consecutive windows of the same file, so each file is opened once."""
    group: list[Window] = []
    for win in windows:
        if group and win.path != group[0].path:
            yield group[0].path, group
            group = []
        group.append(win)
    if group:
        yield group[0].path, group


def _tensor(pixels: list[np.ndarray], device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous().to(device)


def adapt_to_inputs(model: torch.nn.Module, windows: Sequence[Window], cfg: PredictConfig, device: torch.device,
                    on_window: Callable[[int], None] | None = None) -> int:
    """Re-estimate ``model``'s BatchNorm statistics on ``windows`` (this rank's share of :func:`plan_windows`);
    returns the windows used on all ranks."""
    from distseg.ops.adabn import reestimate_bn

    try:
        return reestimate_bn(model, window_batches(windows, cfg, device, on_window))
    except ValueError as exc:
        raise PredictError(f"--adapt-bn: {exc}; it needs at least 2 windows without nodata") from None
