"""Evaluate any stage folder or weights file on a split: whole tiles, and sliding windows like ``predict``.

The measurement rule: the headline of a stage folder is its model at the end of the fixed schedule
(``last/model.safetensors``), never the one validation picked, which has seen the validation split. When the stage
validated during training (it has ``best/``), the best-validation model's whole-tile metrics are reported beside
the headline as ``best_val``. ``--checkpoint best`` makes the best-validation model the headline instead.
"""
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
from distseg.engine.runlog import process_age
from distseg.stages.common import StageError
from distseg.stages.config import DataConfig
from distseg.stages.data import data_class_map, make_loader, pool_samples
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


class AdaptBN:
    """Re-estimates a loaded model's BatchNorm statistics on the unlabelled split of some shard folders (checked
    before any model is built), and remembers what it read for eval.json."""

    def __init__(self, folders: list[str], env, batch_size: int) -> None:
        self.folders, self.env, self.batch_size = [str(f) for f in folders], env, max(2, batch_size)
        self.split = DataConfig.unlabeled_split
        pool_samples(self.folders, self.split)
        self.images = 0

    def __call__(self, model) -> None:
        from distseg.ops.adabn import reestimate_bn

        loader = make_loader(self.folders, self.split, StreamConfig(), self.env, batch_size=self.batch_size,
                             train=False)
        try:
            self.images = reestimate_bn(model, (b.image.to(self.env.device) for b in loader))
        except ValueError as exc:
            raise StageError(f"--adapt-bn {' '.join(self.folders)}: {exc}") from None

    def record(self) -> dict[str, Any]:
        """eval.json's ``adapt_bn``: what the statistics were re-estimated on."""
        return {"folders": self.folders, "split": self.split, "images": self.images}


LAST, BEST = "last", "best"
"""The two models a validated stage folder holds (its ``last/`` and ``best/`` exports, see engine/loop.py)."""


def stage_models(folder: Path, checkpoint: str = LAST) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The headline model of a stage folder and its best-validation model (None when the stage never validated),
    each as ``{"checkpoint", "step", "weights"}`` (weights relative to the folder).

    The headline is ``last/`` (``checkpoint="best"``: ``best/``); a folder without ``last/`` (not written by the
    training loop) has only its root weights, which then stand for the last model.
    """
    record = ckpt.read_stage(folder)
    last = {"checkpoint": LAST, "step": record.get("steps"),
            "weights": f"{LAST}/{ckpt.WEIGHTS}" if (folder / LAST).is_dir() else ckpt.WEIGHTS}
    best = ({"checkpoint": BEST, "step": record.get("best_step"), "weights": f"{BEST}/{ckpt.WEIGHTS}"}
            if (folder / BEST).is_dir() else None)
    if checkpoint == LAST:
        return last, best
    if best is None:
        raise StageError(f"{folder}: --checkpoint best, but the stage never validated (no {BEST}/)")
    return best, best


def same_model(headline: dict[str, Any], best: dict[str, Any]) -> bool:
    """Whether the best-validation model is the headline one: chosen as it, or validated at the last step (the
    training loop then exports the same state to ``best/`` and ``last/``), so it need not be evaluated twice."""
    return headline is best or (best["step"] is not None and best["step"] == headline["step"])


def run(model_path: str, shards: str, *, split: str = "val", sliding: bool = True, tile: int = 512,
        overlap: float = 0.25, batch_size: int = 4, out: str | None = None, model_config: str | None = None,
        classes: str | None = None, local_rank: int | None = None, device: str | None = None,
        checkpoint: str = LAST, adapt_bn: list[str] | None = None) -> dict[str, Any]:
    """Write ``eval.json`` (into the stage folder, or ``out``) and print per-class tables on rank 0.

    ``adapt_bn``: shard folders whose unlabelled split every measured model's BatchNorm statistics are re-estimated
    on first (AdaBN, :mod:`distseg.ops.adabn`: the imagery to map, without its labels); eval.json's ``adapt_bn``
    records the folders and the image count.

    eval.json's ``whole_tile`` (and ``sliding_window``) are the headline model's; ``checkpoint`` and ``step`` say
    which it is (None for a bare weights file), and ``best_val`` holds the best-validation model's whole-tile
    metrics when the stage validated during training. ``startup_s`` is how long after the process started the
    first batch was asked for (None without /proc), as a training stage logs its own in metrics.jsonl."""
    if checkpoint not in (LAST, BEST):
        raise StageError(f"--checkpoint {checkpoint!r}: choose {LAST!r} or {BEST!r}")
    env = init_distributed(local_rank, device)
    data_classes = data_class_map(shards)
    adapt = AdaptBN(adapt_bn, env, batch_size) if adapt_bn else None
    folder = Path(model_path)
    if folder.is_dir():
        headline, best = stage_models(folder, checkpoint)
    elif checkpoint == BEST:
        raise StageError(f"{model_path}: --checkpoint best needs a stage folder (a weights file is one model)")
    else:
        headline, best = {"checkpoint": None, "step": None, "weights": None}, None

    def load(model: dict[str, Any]):
        """The model (of the folder, or the bare weights file), checked against the data's classes."""
        net, class_map = ckpt.load_inference_model(model_path, env.device, model_config=model_config,
                                                   classes=classes, which=model["weights"] or ckpt.WEIGHTS)
        if class_map != data_classes:
            raise StageError(f"{model_path}: the model's classes {class_map.names} differ from the data's "
                             f"{data_classes.names} ({shards})")
        if adapt is not None:
            adapt(net)
        return net, class_map

    model, class_map = load(headline)
    stream = StreamConfig()
    loader = make_loader(shards, split, stream, env, batch_size=batch_size, train=False)
    no_autocast = torch.autocast(env.device.type, enabled=False)
    results = {"split": split, "shards": str(shards), "model": str(model_path), **headline,
               "startup_s": process_age(), **({"adapt_bn": adapt.record()} if adapt else {}),
               "whole_tile": evaluate_model(model, loader, class_map, env, no_autocast)}
    if sliding:
        single = make_loader(shards, split, stream, env, batch_size=1, train=False)
        results["sliding_window"] = {"tile": tile, "overlap": overlap,
                                     **sliding_window_metrics(model, single, class_map, env, tile, overlap)}
    if best is not None:
        whole = results["whole_tile"] if same_model(headline, best) else \
            evaluate_model(load(best)[0], loader, class_map, env, no_autocast)
        results["best_val"] = {"step": best["step"], "whole_tile": whole}
    if env.is_main:
        print_tables(results, class_map.names)
        target = Path(out) if out else (folder if folder.is_dir() else folder.parent)
        target.mkdir(parents=True, exist_ok=True)
        ckpt.write_json_atomic(target / "eval.json", results)
    return results


def print_tables(results: dict[str, Any], names: list[str]) -> None:
    """The headline tables, then the best-validation one, each titled with the model it measures."""
    from rich.console import Console

    console = Console()
    which = f" ({results['checkpoint']}, step {results['step']})" if results["checkpoint"] else ""
    for key in ("whole_tile", "sliding_window"):
        if key in results:
            title = f"{results['split']}: {key.replace('_', ' ')}{which}"
            console.print(format_table(results[key], names, title=title))
    if "best_val" in results:
        title = f"{results['split']}: whole tile (best validation, step {results['best_val']['step']})"
        console.print(format_table(results["best_val"]["whole_tile"], names, title=title))


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
    checkpoint: str = typer.Option(LAST, "--checkpoint",
                                   help="Headline model of a stage folder: 'last' (last/, the end of the fixed "
                                        "schedule: the measurement rule) or 'best' (best/, chosen by validation). "
                                        "The best-validation model is reported beside a 'last' headline anyway."),
    adapt_bn: Optional[list[str]] = typer.Option(
        None, "--adapt-bn", help="Shard folder (repeatable) whose unlabelled images the model's BatchNorm statistics "
                                 "are re-estimated on before it is measured (AdaBN: the imagery to map, no labels)."),
) -> None:
    """Write eval.json and print per-class tables (launch with deepspeed/torchrun to split the tiles).

    A stage folder's headline is its last model (last/: the end of the fixed schedule); when the stage validated
    during training, its best-validation model (best/) is reported beside it as eval.json's best_val, never instead.
    """
    from distseg.errors import reported
    from distseg.supervise import start_watchdog

    start_watchdog()
    with reported():
        run(model, data, split=split, sliding=sliding, tile=tile, overlap=overlap, batch_size=batch_size, out=out,
            model_config=model_config, classes=classes, local_rank=local_rank, device=device, checkpoint=checkpoint,
            adapt_bn=adapt_bn)


KIND = StageKind(EVAL, None, parent="required", script="evaluate.py", command=app,
                 summary="metrics of a stage folder or weights file on a split (eval.json)")
