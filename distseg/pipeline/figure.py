"""results.png: a few test tiles with their ground truth and every evaluated model's prediction.

The tiles are chosen to show what the rows differ on (:func:`pick_tiles`): first tiles that together show
every class of the candidates' ground truth, then the tiles where the rows (ground truth and predictions)
disagree on the most pixels.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from distseg.pipeline.plan import Plan
from distseg.pipeline.recipe import EVAL


CANDIDATES_PER_TILE = 8
"""The figure's tiles are picked among this many times as many test tiles (the first batch of the split)."""


def _candidates(shards: str, split: str, count: int):
    """Candidate tiles of a split, unaugmented: ([0, 1] float images B×3×H×W, masks B×H×W)."""
    from distseg.data.stream import StreamConfig, build_loader

    loader = build_loader(shards, split, StreamConfig(batch_size=CANDIDATES_PER_TILE * count, num_workers=0),
                          train=False)
    batch = next(iter(loader))
    return batch.image, batch.mask


def pick_tiles(masks: np.ndarray, preds: list[np.ndarray], count: int, ignore_index: int) -> list[int]:
    """Indices (ascending) of ``count`` tiles that show every class and where the rows disagree most.

    ``masks`` is B×H×W ground truth, ``preds`` one B×H×W prediction per row. A tile's disagreement is the
    share of its pixels, labelled ones only, where the ground truth and the rows do not all agree; ignored pixels
    count as agreeing, so a mostly unlabelled tile ranks low. Tiles are taken greedily: while some class of the
    candidates' ground truth is not shown yet, the tile showing the most missing classes (ties: the higher
    disagreement); then the most disagreeing tiles.
    """
    labelled = masks != ignore_index
    differs = np.zeros(masks.shape, dtype=bool)
    for pred in preds:  # all rows agree exactly where every prediction equals the ground truth
        differs |= pred != masks
    disagreement = (differs & labelled).reshape(len(masks), -1).mean(1)
    shown = [set(np.unique(m[v]).tolist()) for m, v in zip(masks, labelled)]
    missing = set().union(*shown) if shown else set()
    chosen: list[int] = []
    while len(chosen) < min(count, len(masks)):
        rest = [i for i in range(len(masks)) if i not in chosen]
        best = max(rest, key=lambda i: (len(shown[i] & missing), disagreement[i], -i))
        chosen.append(best)
        missing -= shown[best]
    return sorted(chosen)


def _colorize(mask: np.ndarray, colors: list[tuple[int, int, int]], ignore_index: int) -> np.ndarray:
    """Index mask -> RGB, ignored pixels black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(colors)] = np.asarray(colors, dtype=np.uint8)
    lut[ignore_index] = 0
    return lut[mask.astype(np.uint8)]


def _row_models(evals: list, data_path) -> tuple[list, list[str]]:
    """One ``(label, model)`` per row label on ``data_path``: the model of its first seed still on disk.

    A table row can outlive its model (weights deleted to save disk, an eval folder copied from another run); the
    figure then draws the row from another seed, or leaves the label out with the reason, instead of failing a
    run whose stages all finished. Returns the rows and one line per label left out.
    """
    from distseg.engine import checkpoint as ckpt

    by_label: dict[str, list] = {}
    for stage in evals:  # row labels in table order, each with its seeds
        if stage.data_path == data_path:
            by_label.setdefault(stage.spec.label or stage.name, []).append(stage)
    rows, left_out = [], []
    for label, stages in by_label.items():
        reasons = []
        for stage in stages:
            headline = json.loads((stage.folder / "eval.json").read_text()).get("weights")  # the table's model
            try:
                model, _ = ckpt.load_inference_model(stage.parent_path, "cpu", which=headline or ckpt.WEIGHTS)
            except ckpt.CheckpointError as exc:
                reasons.append(str(exc))
                continue
            rows.append((label, model))
            break
        else:
            left_out.append(f"{label}: {reasons[0]}")
    return rows, left_out


def write_figure(plan: Plan, path: Path, tiles: int) -> tuple[Path | None, list[str]]:
    """Columns are tiles; rows: image, ground truth, then one row per eval stage on the first eval's data.

    Eval stages on other datasets (other class sets) are left out of the figure; they are in the table. Returns the
    figure's path (None when there is nothing to draw) and one line per row label left out for want of a model.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from distseg.data.classes import ClassMap

    evals = [s for s in plan.stages if s.kind == EVAL and (s.folder / "eval.json").is_file()]
    if not evals or tiles == 0:
        return None, []
    first = evals[0]
    rows, left_out = _row_models(evals, first.data_path)
    if not rows:
        return None, left_out
    class_map = ClassMap.from_manifest(first.data_path)
    images, masks = _candidates(first.data_path, first.eval_options.split, tiles)
    ignored = (masks == class_map.ignore_index).numpy()
    preds = []
    with torch.no_grad():
        for _, model in rows:
            pred = model(images).argmax(1).numpy()
            pred[ignored] = class_map.ignore_index  # no prediction shown where there is no ground truth
            preds.append(pred)
    picked = pick_tiles(masks.numpy(), preds, tiles, class_map.ignore_index)
    images, masks, preds = images[picked], masks[picked], [p[picked] for p in preds]
    colors, ignore = class_map.colors, class_map.ignore_index
    labels = ["image", "ground truth"] + [label for label, _ in rows]
    n = images.shape[0]
    fig, axes = plt.subplots(len(labels), n, figsize=(2.0 * n, 2.0 * len(labels)), squeeze=False)
    for j in range(n):
        panels = [images[j].permute(1, 2, 0).numpy(), _colorize(masks[j].numpy(), colors, ignore)]
        panels += [_colorize(p[j], colors, ignore) for p in preds]
        for i, panel in enumerate(panels):
            ax = axes[i][j]
            ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(labels[i], fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=np.asarray(c) / 255) for c in colors]
    fig.legend(handles, class_map.names, loc="lower center", ncol=min(len(colors), 8), fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path, left_out
