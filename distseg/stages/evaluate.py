"""Evaluate any stage folder or weights file on a split: whole tiles, and sliding windows like ``predict``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import typer

from distseg.data.stream import StreamConfig
from distseg.engine import checkpoint as ckpt
from distseg.engine.distributed import init_distributed
from distseg.engine.metrics import ConfusionMatrix, evaluate_model, format_table
from distseg.stages.common import StageError
from distseg.stages.data import data_class_map, make_loader
from distseg.stages.registry import EVAL, StageKind


@torch.no_grad()
def sliding_window_metrics(model, loader, class_map, env, tile: int, overlap: float) -> dict[str, Any]:
    """Each rank runs the sliding window over its own tiles (one at a time); the matrices are summed."""
    from distseg.inference.config import PredictConfig
    from distseg.inference.raster import ArrayReader
    from distseg.inference.sliding import SlidingWindow

    cm = ConfusionMatrix(class_map.num_classes, class_map.ignore_index, device=env.device)
    window = SlidingWindow(model, class_map.num_classes, PredictConfig(tile=tile, overlap=overlap), env.device, 0, 1)
    for batch in loader:
        for image, mask in zip(batch.image, batch.mask):
            array = image.permute(1, 2, 0).numpy().astype(np.float32)
            pred = np.full(mask.shape, class_map.ignore_index, dtype=np.int64)
            for block in window.run(ArrayReader(array, scale=1.0), class_map.ignore_index):
                h, w = block.labels.shape
                pred[block.y:block.y + h, block.x:block.x + w] = block.labels
            cm.update(torch.from_numpy(pred).to(env.device), mask.to(env.device))
    cm.all_reduce()
    result = cm.compute()
    result["class_names"] = class_map.names
    return result


def run(model_path: str, shards: str, *, split: str = "val", sliding: bool = True, tile: int = 512,
        overlap: float = 0.25, batch_size: int = 4, out: str | None = None, model_config: str | None = None,
        classes: str | None = None, local_rank: int | None = None, device: str | None = None) -> dict[str, Any]:
    """Write ``eval.json`` (into the stage folder, or ``out``) and print per-class tables on rank 0."""
    env = init_distributed(local_rank, device)
    data_classes = data_class_map(shards)
    model, class_map = ckpt.load_inference_model(model_path, env.device, model_config=model_config, classes=classes)
    if class_map != data_classes:
        raise StageError(f"{model_path}: the model's classes {class_map.names} differ from the data's "
                         f"{data_classes.names} ({shards})")
    stream = StreamConfig()
    loader = make_loader(shards, split, stream, env, batch_size=batch_size, train=False)
    results = {"split": split, "shards": str(shards), "model": str(model_path),
               "whole_tile": evaluate_model(model, loader, class_map, env, torch.autocast(env.device.type,
                                                                                          enabled=False))}
    if sliding:
        single = make_loader(shards, split, stream, env, batch_size=1, train=False)
        results["sliding_window"] = {"tile": tile, "overlap": overlap,
                                     **sliding_window_metrics(model, single, class_map, env, tile, overlap)}
    if env.is_main:
        from rich.console import Console

        console = Console()
        for key in ("whole_tile", "sliding_window"):
            if key in results:
                console.print(format_table(results[key], class_map.names, title=f"{split}: {key.replace('_', ' ')}"))
        target = Path(out) if out else (Path(model_path) if Path(model_path).is_dir() else Path(model_path).parent)
        target.mkdir(parents=True, exist_ok=True)
        ckpt.write_json_atomic(target / "eval.json", results)
    return results


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Metrics of a stage folder or weights file on a split: whole tiles and sliding windows.")


@app.command()
def main(
    model: str = typer.Argument(..., help="Stage folder, or a weights file with --model-config and --classes."),
    data: str = typer.Option(..., "--data", help="Shard folder."),
    split: str = typer.Option("val", "--split"),
    sliding: bool = typer.Option(True, "--sliding/--no-sliding", help="Also evaluate with sliding windows."),
    tile: int = typer.Option(512, "--tile"),
    overlap: float = typer.Option(0.25, "--overlap"),
    batch_size: int = typer.Option(4, "--batch-size"),
    out: Optional[str] = typer.Option(None, "--out", help="Folder for eval.json (default: the stage folder)."),
    model_config: Optional[str] = typer.Option(None, "--model-config"),
    classes: Optional[str] = typer.Option(None, "--classes"),
    local_rank: Optional[int] = typer.Option(None, "--local_rank", "--local-rank", hidden=True),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """Write eval.json and print per-class tables (launch with deepspeed/torchrun to split the tiles)."""
    from distseg.errors import reported
    from distseg.supervise import start_watchdog

    start_watchdog()
    with reported():
        run(model, data, split=split, sliding=sliding, tile=tile, overlap=overlap, batch_size=batch_size, out=out,
            model_config=model_config, classes=classes, local_rank=local_rank, device=device)


KIND = StageKind(EVAL, None, parent="required", script="evaluate.py", command=app,
                 summary="metrics of a stage folder or weights file on a split (eval.json)")
