"""``distseg predict``: segment images, folders and GeoTIFFs of any size with a trained model.

Only typer and the standard library are imported here; torch, rasterio and the model code are
imported inside the command so ``distseg --help`` stays instant.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from distseg.limits import MAX_PIXELS

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
    max_pixels: int = typer.Option(MAX_PIXELS, "--max-pixels", help="Refuse PNG/JPEG inputs with more pixels "
                                   "(decoded whole; a decompression bomb guard). GeoTIFFs are read by windows."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar or summary table."),
    vector: Optional[Path] = typer.Option(None, "--vector", help="Also write the class regions as polygons to this "
                                          ".gpkg (the raster's CRS) or .geojson (EPSG:4326) file."),
    vector_classes: Optional[str] = typer.Option(None, "--vector-classes", help="Comma-separated classes to "
                                                 "vectorise (default: all), e.g. building."),
    simplify: str = typer.Option("1px", "--simplify", help="Outline simplification tolerance: pixels with a px "
                                 "suffix (1px), else map units (0.1 = 10 cm in a metric CRS); 0 keeps pixel edges."),
    min_area: str = typer.Option("0", "--min-area", help="Drop polygons smaller than this many m² (or pixels with "
                                 "a px suffix)."),
    fill_holes: bool = typer.Option(False, "--fill-holes/--keep-holes", help="Fill the holes of polygons."),
    regularize: Optional[str] = typer.Option(None, "--regularize", help="Comma-separated classes whose outlines "
                                             "get right angles (e.g. building)."),
    cog: bool = typer.Option(False, "--cog", help="Write the class raster as a cloud-optimised GeoTIFF with "
                             "mode-resampled overviews."),
    georef_from_name: bool = typer.Option(False, "--georef-from-name", help="Georeference PNG/JPEG web-map tile "
                                          "chips named ...<x>-<y>-<z> (EPSG:3857); their outputs become GeoTIFFs."),
    adapt_bn: bool = typer.Option(False, "--adapt-bn", help="Re-estimate the model's BatchNorm statistics on "
                                  "the inputs first (AdaBN): for imagery of another place than the labels."),
    truth: Optional[Path] = typer.Option(None, "--truth", help="Folder of ground-truth masks named like the inputs; "
                                         "with --objects, scores the predictions."),
    objects: Optional[str] = typer.Option(None, "--objects", help="Class whose objects are counted against "
                                          "--truth (precision, recall, F1 at IoU >= 0.5, and pixel IoU)."),
) -> None:
    """Sliding-window prediction with blended overlaps: index mask, colour map, overlay, confidence, areas,
    optionally polygons, a cloud-optimised GeoTIFF and object scores."""
    from distseg.errors import describe, reported
    from distseg.inference.summary import combine, print_summary
    from distseg.predict import PredictConfig

    try:
        cfg = PredictConfig(tile=tile, overlap=overlap, batch_size=batch_size, tta=tta, dtype=dtype, device=device,
                            chunk_width=chunk_width, bands=_parse_bands(bands), scale=scale, color=color,
                            overlay=overlay, confidence=confidence, force=force, max_pixels=max_pixels,
                            vector=_vector_config(vector, vector_classes, simplify, min_area, fill_holes, regularize),
                            cog=cog, georef_from_name=georef_from_name, objects=_objects_config(truth, objects),
                            adapt_bn=adapt_bn)
    except ValueError as exc:
        _fail(describe(exc))
    with reported():
        rank, summaries = _predict_into(out, cfg, weights, inputs, model_config, classes, quiet)
    if rank == 0 and not quiet:
        for summary in summaries if len(summaries) <= _TABLES_MAX else [combine(summaries)]:
            print_summary(summary)
        if cfg.adapt_bn and summaries:
            typer.echo(f"BatchNorm statistics re-estimated on {summaries[0]['adapt_bn']['windows']} windows of "
                       f"{summaries[0]['adapt_bn']['inputs']} input(s) (--adapt-bn)")
        typer.echo(f"wrote {len(summaries)} prediction(s) to {out} (per-file areas in <name>_summary.json)")
        if cfg.vector is not None:
            typer.echo(f"wrote polygons to {cfg.vector.path}")
        if cfg.objects is not None and summaries:
            _print_objects(summaries, cfg.objects)


def _names(text: Optional[str]) -> Optional[tuple[str, ...]]:
    """'a, b' -> ('a', 'b')."""
    return None if text is None else tuple(n.strip() for n in text.split(",") if n.strip())


def _vector_config(path: Optional[Path], classes: Optional[str], simplify: str, min_area: str, fill_holes: bool,
                   regularize: Optional[str]):
    """The --vector options as a VectorConfig (None without --vector)."""
    from distseg.inference.vector import VectorConfig, parse_amount

    if path is None:
        return None
    tolerance, tolerance_px = parse_amount(simplify, "--simplify")
    area, area_px = parse_amount(min_area, "--min-area")
    return VectorConfig(path, _names(classes), tolerance, tolerance_px, area, area_px, fill_holes,
                        _names(regularize) or ())


def _objects_config(truth: Optional[Path], class_name: Optional[str]):
    """--truth and --objects as an ObjectsConfig (both or neither)."""
    from distseg.inference.objects import ObjectsConfig

    if truth is None and class_name is None:
        return None
    if truth is None or class_name is None:
        raise ValueError("--truth and --objects go together: --truth MASKS_DIR --objects CLASS")
    return ObjectsConfig(truth, class_name)


def _print_objects(summaries: list, cfg) -> None:
    """One line with the object scores over all inputs."""
    from distseg.inference.objects import total_objects

    t = total_objects(summaries, cfg)

    def pct(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}"

    typer.echo(f"objects '{t['class']}' (IoU >= {t['iou_threshold']}): {t['found']} found, {t['missed']} missed, "
               f"{t['false']} false; precision {pct(t['precision'])}, recall {pct(t['recall'])}, F1 {pct(t['f1'])}; "
               f"pixel IoU {pct(t['pixel_iou'])} (in objects_{t['class']}.json)")


def _predict_into(out: Path, cfg, weights: Path, inputs: List[Path], model_config: Optional[Path],
                  classes: Optional[Path], quiet: bool) -> tuple[int, list]:
    """Load the model and predict every input into ``out``; (this rank, its summaries). A failure before any
    output exists leaves no empty output folder behind."""
    from distseg.engine.distributed import init_distributed, shutdown
    from distseg.predict import predict_paths, resolve_device

    created = _writable(out)
    try:
        torch_device = resolve_device(cfg.device)
        env = init_distributed(device=torch_device.type, single_process_group=False)
        model, class_map = _load(weights, torch_device, model_config, classes)
        summaries = predict_paths(model, class_map, inputs, out, cfg, torch_device, progress=not quiet)
        shutdown()
        return env.rank, summaries
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _writable(out: Path) -> bool:
    """Fail before any work when ``--out`` cannot be created or written; returns whether it was created here."""
    import tempfile

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out, prefix=".distseg-probe-"):
        pass
    return created


def _load(weights: Path, device: object, model_config: Optional[Path], classes: Optional[Path]) -> tuple:
    """Model and class map from a stage folder or weights file; ``--classes`` overrides a stage's class map."""
    from distseg.data.classes import ClassMap
    from distseg.engine.checkpoint import load_inference_model

    model, class_map = load_inference_model(weights, device, model_config=str(model_config) if model_config else None,
                                            classes=str(classes) if classes else None)
    if classes is not None and weights.is_dir():
        class_map = ClassMap.from_file(classes)
    return model, class_map
