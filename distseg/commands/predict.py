"""``distseg predict``: segment images, folders and GeoTIFFs of any size with a trained model.

Only typer and the standard library are imported here; torch, rasterio and the model code are
imported inside the command so ``distseg --help`` stays instant.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

_TABLES_MAX = 5
"""Up to this many inputs get a table each; more get one combined table."""


def _fail(message: str) -> None:
    """Report bad input as one stderr line (once, from rank 0 under a launcher) and exit with status 2."""
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _parse_bands(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """'1,2,3' -> (1, 2, 3)."""
    if text is None:
        return None
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        _fail(f"--bands {text!r}: expected three comma-separated band numbers, e.g. --bands 1,2,3")


def predict(
    weights: Path = typer.Argument(..., help="A stage folder (model.safetensors + stage.json) or a weights file "
                                   "(then --model and --classes are required)."),
    inputs: List[Path] = typer.Argument(..., help="Images (png/jpg), GeoTIFFs (tif) or folders of them."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    model_config: Optional[Path] = typer.Option(None, "--model", help="Model config (YAML/JSON) for a weights file."),
    classes: Optional[Path] = typer.Option(None, "--classes", help="Class map (YAML/JSON); required with a weights "
                                           "file, overrides the stage's class map otherwise."),
    tile: int = typer.Option(512, "--tile", help="Window size in pixels."),
    overlap: float = typer.Option(0.25, "--overlap", help="Fraction of the window shared with its neighbours."),
    batch_size: int = typer.Option(4, "--batch-size", help="Windows per forward pass."),
    tta: bool = typer.Option(False, "--tta/--no-tta", help="Average over horizontal/vertical flips (4x the work)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16 forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    bands: Optional[str] = typer.Option(None, "--bands", help="1-based bands to use as RGB, e.g. 1,2,3."),
    scale: Optional[float] = typer.Option(None, "--scale", help="Input value meaning full brightness "
                                          "(default 255; required for non-8-bit inputs)."),
    color: bool = typer.Option(True, "--color/--no-color", help="Write the class-coloured map."),
    overlay: bool = typer.Option(False, "--overlay", help="Write class colours blended over the input."),
    confidence: bool = typer.Option(False, "--confidence", help="Write the per-pixel confidence (0-255)."),
    chunk_width: int = typer.Option(4096, "--chunk-width", help="Columns held in memory at once (bounds memory)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar or summary table."),
) -> None:
    """Sliding-window prediction with blended overlaps: index mask, colour map, overlay, confidence, areas."""
    from distseg.config import ConfigError
    from distseg.data.errors import DataError
    from distseg.engine.checkpoint import CheckpointError
    from distseg.inference.errors import PredictError
    from distseg.inference.summary import combine, print_summary
    from distseg.models.architectures import InputSizeError
    from distseg.models.weights import WeightsError
    from distseg.engine.distributed import init_distributed
    from distseg.predict import PredictConfig, predict_paths, resolve_device

    try:
        cfg = PredictConfig(tile=tile, overlap=overlap, batch_size=batch_size, tta=tta, dtype=dtype, device=device,
                            chunk_width=chunk_width, bands=_parse_bands(bands), scale=scale, color=color,
                            overlay=overlay, confidence=confidence, force=force)
    except ValueError as exc:
        _fail(str(exc))
    try:
        torch_device = resolve_device(cfg.device)
        env = init_distributed(device=torch_device.type, single_process_group=False)
        rank, world_size = env.rank, env.world_size
        try:
            model, class_map = _load(weights, torch_device, model_config, classes)
            summaries = predict_paths(model, class_map, inputs, out, cfg, torch_device, progress=not quiet)
        finally:
            if world_size > 1:
                import torch.distributed

                torch.distributed.destroy_process_group()
    except (PredictError, CheckpointError, DataError, ConfigError, WeightsError, InputSizeError) as exc:
        _fail(str(exc))
    if rank == 0 and not quiet:
        for summary in summaries if len(summaries) <= _TABLES_MAX else [combine(summaries)]:
            print_summary(summary)
        typer.echo(f"wrote {len(summaries)} prediction(s) to {out} (per-file areas in <name>_summary.json)")


def _load(weights: Path, device: object, model_config: Optional[Path], classes: Optional[Path]) -> tuple:
    """Model and class map from a stage folder or weights file; ``--classes`` overrides a stage's class map."""
    from distseg.data.classes import ClassMap
    from distseg.engine.checkpoint import load_inference_model

    model, class_map = load_inference_model(weights, device, model_config=str(model_config) if model_config else None,
                                            classes=str(classes) if classes else None)
    if classes is not None and weights.is_dir():
        class_map = ClassMap.from_file(classes)
    return model, class_map
