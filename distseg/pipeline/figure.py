"""results.png: a few test tiles with their ground truth and every evaluated model's prediction."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from distseg.pipeline.plan import Plan
from distseg.pipeline.recipe import EVAL


def _tiles(shards: str, split: str, count: int, ignore_index: int):
    """``count`` tiles of a split, unaugmented: ([0, 1] float images B×3×H×W, masks B×H×W).

    Taken from the first few batches, preferring the tiles with the fewest ignored (e.g. padded) pixels.
    """
    import torch

    from distseg.data.stream import StreamConfig, build_loader

    loader = build_loader(shards, split, StreamConfig(batch_size=4 * count, num_workers=0), train=False)
    batch = next(iter(loader))
    valid = (batch.mask != ignore_index).flatten(1).float().mean(1)
    order = torch.sort(torch.argsort(valid, descending=True, stable=True)[:count]).values
    return batch.image[order], batch.mask[order]


def _colorize(mask: np.ndarray, colors: list[tuple[int, int, int]], ignore_index: int) -> np.ndarray:
    """Index mask -> RGB, ignored pixels black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(colors)] = np.asarray(colors, dtype=np.uint8)
    lut[ignore_index] = 0
    return lut[mask.astype(np.uint8)]


def write_figure(plan: Plan, path: Path, tiles: int) -> Path | None:
    """Columns are tiles; rows: image, ground truth, then one row per eval stage on the first eval's data.

    Eval stages on other datasets (other class sets) are left out of the figure; they are in the table.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from distseg.engine import checkpoint as ckpt

    evals = [s for s in plan.stages if s.kind == EVAL and (s.folder / "eval.json").is_file()]
    if not evals or tiles == 0:
        return None
    first, labels_seen = evals[0], set()
    rows = []
    for s in evals:  # one line per row label (its first seed), on the first eval's data
        label = s.spec.label or s.name
        if s.data_path == first.data_path and label not in labels_seen:
            labels_seen.add(label)
            rows.append(s)
    from distseg.data.classes import ClassMap

    class_map = ClassMap.from_manifest(first.data_path)
    images, masks = _tiles(first.data_path, first.eval_options.split, tiles, class_map.ignore_index)
    ignored = (masks == class_map.ignore_index).numpy()
    preds = []
    with torch.no_grad():
        for stage in rows:
            model, _ = ckpt.load_inference_model(stage.parent_path, "cpu")
            pred = model(images).argmax(1).numpy()
            pred[ignored] = class_map.ignore_index  # no prediction shown where there is no ground truth
            preds.append(pred)
    colors, ignore = class_map.colors, class_map.ignore_index
    labels = ["image", "ground truth"] + [s.spec.label or s.name for s in rows]
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
    return path
