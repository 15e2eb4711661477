"""Sliding-window inference on images and GeoTIFFs of any size (``distseg predict``).

The entry points take a plain ``nn.Module`` (float B×3×H×W in [0, 1] -> logits B×C×H×W) and a
class map, so they work with any model: ``predict_array`` for an in-memory image, ``predict_file``
for one file written to an output folder, ``predict_paths`` for files and folders. Under a
``torchrun``/``deepspeed`` launch (``WORLD_SIZE`` > 1) the windows are split across ranks, the
probability sums are reduced to rank 0, and rank 0 alone writes the outputs.

Beside the rasters, a job can write the class regions as polygons into one vector file (``cfg.vector``),
the class raster as a cloud-optimised GeoTIFF (``cfg.cog``), and object-level scores against ground-truth
masks (``cfg.objects``); every class raster gets a QGIS style.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from distseg.engine import distributed as dist
from distseg.inference.config import PredictConfig
from distseg.inference.errors import PredictError
from distseg.inference.georef import check_georeferenced, is_georeferenced, tile_geo
from distseg.inference.raster import ArrayReader, Reader, expand_inputs, gdal_env, open_reader
from distseg.inference.sliding import SlidingWindow, WindowPlan
from distseg.inference.summary import AreaCounter, write_summary
from distseg.inference.objects import objects_path, score_file, total_objects
from distseg.inference.polygonize import Polygonizer
from distseg.inference.styles import convert_to_cog, write_qml
from distseg.inference.vector import VectorWriter, check_vector_output, require_geo_packages
from distseg.inference.writers import check_outputs, open_outputs, output_paths

__all__ = ["ClassMapLike", "Prediction", "PredictConfig", "PredictError", "check_model", "predict_array",
           "predict_file", "predict_paths", "resolve_device"]


class ClassMapLike(Protocol):
    """What prediction needs from :class:`distseg.data.classes.ClassMap`."""

    num_classes: int
    names: list[str]
    colors: list[tuple[int, int, int]]
    ignore_index: int


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The result of :func:`predict_array`."""

    labels: np.ndarray
    """uint8 H × W class indices (``ignore_index`` on nodata)."""
    confidence: np.ndarray
    """float32 H × W blended probability of the predicted class (0 on nodata)."""


def resolve_device(name: str) -> torch.device:
    """"auto" -> this rank's GPU when CUDA is available, else cpu; "cuda" -> this rank's GPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    except RuntimeError:
        raise PredictError(f"--device {name!r}: not a torch device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PredictError(f"--device {name!r}: CUDA is not available on this machine; use --device cpu")
    return device


def check_model(model: torch.nn.Module, class_map: ClassMapLike, device: torch.device, size: int = 64) -> None:
    """Fail before any output is opened when the model's class count disagrees with the class map."""
    with torch.inference_mode():
        logits = model(torch.zeros(1, 3, size, size, device=device))
    if logits.ndim != 4 or logits.shape[1] != class_map.num_classes:
        raise PredictError(f"the model predicts {logits.shape[1] if logits.ndim == 4 else '?'} classes "
                           f"(logits {tuple(logits.shape)}) but the class map has {class_map.num_classes} "
                           f"({', '.join(class_map.names)}): the weights and the class map disagree")


def predict_array(model: torch.nn.Module, image: np.ndarray, num_classes: int, cfg: PredictConfig | None = None,
                  valid: np.ndarray | None = None, ignore_index: int = 255,
                  device: torch.device | str = "cpu") -> Prediction | None:
    """Predict an H × W × 3 image (uint8, or float in [0, 1]) held in memory.

    Returns None on ranks other than 0 of a process group (they only contribute windows).
    """
    cfg = cfg or PredictConfig()
    device = torch.device(device)
    reader = ArrayReader(image, valid=valid, scale=cfg.scale)
    labels = np.full((reader.height, reader.width), ignore_index, dtype=np.uint8)
    confidence = np.zeros((reader.height, reader.width), dtype=np.float32)
    rank, world = dist.rank(), dist.world_size()
    engine = SlidingWindow(model.to(device).eval(), num_classes, cfg, device, rank, world)
    for block in engine.run(reader, ignore_index):
        h, w = block.labels.shape
        labels[block.y:block.y + h, block.x:block.x + w] = block.labels
        confidence[block.y:block.y + h, block.x:block.x + w] = block.confidence
    return Prediction(labels, confidence) if rank == 0 else None


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int, label: str) -> Iterator[Callable[[int], None] | None]:
    """A rich bar over windows, or nothing (non-zero ranks, tests)."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("windows"),
                  TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def predict_file(model: torch.nn.Module, class_map: ClassMapLike, path: str | Path, out_dir: str | Path,
                 cfg: PredictConfig, device: torch.device | str = "cpu", progress: bool = True,
                 vector: VectorWriter | None = None, truth: Path | None = None,
                 notes: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Predict one image or GeoTIFF into ``out_dir``; returns the area summary (None off rank 0).

    ``vector`` (rank 0) receives the file's polygons; with ``truth`` (a ground-truth mask, ``cfg.objects``
    set) the summary also holds the object scores; ``notes`` (what the job did to the model, e.g. ``adapt_bn``)
    are copied into the summary.
    """
    path, out_dir = Path(path), Path(out_dir)
    paths = output_paths(out_dir, path, cfg)
    check_outputs(paths, cfg.force)
    with gdal_env(path, cfg.gdal_cache_mb):
        reader = open_reader(path, cfg.bands, cfg.scale, cfg.max_pixels)
        try:
            if cfg.georef_from_name and not is_georeferenced(reader.geo):
                reader.geo = tile_geo(path, reader.width, reader.height)
            summary = _predict_reader(model, class_map, reader, paths, cfg, torch.device(device), progress, vector)
        finally:
            reader.close()
    if summary is not None and truth is not None:
        summary["objects"] = score_file(paths["mask"], truth, class_map, cfg.objects)
    if summary is not None:
        summary.update(notes or {})
        write_summary(summary, paths["summary"])
    return summary


def _predict_reader(model: torch.nn.Module, class_map: ClassMapLike, reader: Reader, paths: dict[str, Path],
                    cfg: PredictConfig, device: torch.device, progress: bool,
                    vector: VectorWriter | None) -> dict[str, Any] | None:
    """Stream the blocks of an opened input into its outputs and polygons (rank 0) and summarise the areas."""
    rank, world = dist.rank(), dist.world_size()
    engine = SlidingWindow(model.to(device).eval(), class_map.num_classes, cfg, device, rank, world)
    outputs = polygons = None
    if rank == 0:
        paths["mask"].parent.mkdir(parents=True, exist_ok=True)
        if vector is not None:
            layer = vector.begin(reader.path, reader.geo, reader.height, reader.width)
            polygons = Polygonizer(reader.height, reader.width, vector.class_indices)
        outputs = open_outputs(paths, reader, cfg, class_map.colors, class_map.ignore_index)
    counter = AreaCounter()
    total = WindowPlan.build(reader.height, reader.width, cfg).num_windows(rank, world)
    try:
        with _progress_bar(progress and rank == 0, total, reader.path.name) as advance:
            for block in engine.run(reader, class_map.ignore_index, advance):
                outputs.write(block)
                counter.add(block.labels)
                if polygons is not None:
                    vector.write([f for r in polygons.add(block.y, block.x, block.labels, block.confidence)
                                  for f in layer.features(r)])
        if polygons is not None:
            vector.write([f for r in polygons.finish() for f in layer.features(r)])
    except BaseException:
        if outputs is not None:
            outputs.abort()
        raise
    if outputs is None:
        return None
    outputs.commit()
    if cfg.cog:
        convert_to_cog(paths["mask"])
    write_qml(paths["style"], class_map.names, class_map.colors, class_map.ignore_index)
    area = reader.geo.pixel_area_m2 if reader.geo is not None else None
    return counter.summary(reader.path, reader.height, reader.width, class_map.names, class_map.ignore_index, area)


def _adapt_bn(model: torch.nn.Module, files: list[Path], cfg: PredictConfig, device: torch.device,
             progress: bool) -> dict[str, int]:
    """``--adapt-bn``: the model's BatchNorm statistics re-estimated on the inputs' windows (inference/adapt.py),
    this rank's share of them; returns the record each summary keeps."""
    from distseg.inference.adapt import adapt_to_inputs, plan_windows
    from distseg.inference.windows import shard

    mine = shard(plan_windows(files, cfg), dist.rank(), dist.world_size())
    with _progress_bar(progress and dist.rank() == 0, len(mine), "AdaBN statistics") as advance:
        windows = adapt_to_inputs(model, mine, cfg, device, advance)
    return {"windows": windows, "inputs": len(files)}


def _check_extras(files: list[Path], class_map: ClassMapLike, out_dir: Path, cfg: PredictConfig) -> dict[Path, Path]:
    """Check what --vector, --cog and --truth/--objects need before any output exists; returns the ground-truth
    mask of each input (empty without ``cfg.objects``)."""
    if cfg.vector is not None:
        require_geo_packages()
        cfg.vector.class_indices(class_map.names)
        check_vector_output(cfg.vector, cfg.force)
        check_georeferenced(files, cfg.georef_from_name, "--vector")
    if cfg.cog:
        for f in files:
            if output_paths(out_dir, f, cfg)["mask"].suffix != ".tif":
                raise PredictError(f"{f}: --cog needs GeoTIFF outputs, written for GeoTIFF inputs (or PNG/JPEG "
                                   f"chips with --georef-from-name)")
    if cfg.objects is None:
        return {}
    require_geo_packages("--objects", ("scipy",))
    if cfg.objects.class_name not in class_map.names:
        raise PredictError(f"--objects: unknown class {cfg.objects.class_name!r}; the class map has "
                           f"{', '.join(class_map.names)}")
    check_outputs({"objects": objects_path(out_dir, cfg.objects)}, cfg.force)
    return cfg.objects.truth_files(files)


def predict_paths(model: torch.nn.Module, class_map: ClassMapLike, inputs: Sequence[str | Path],
                  out_dir: str | Path, cfg: PredictConfig, device: torch.device | str = "cpu",
                  progress: bool = True) -> list[dict[str, Any]]:
    """Predict files and folders; every input and output is checked before the first one starts."""
    out_dir, device = Path(out_dir), torch.device(device)
    files = expand_inputs(inputs)
    seen: dict[Path, Path] = {}
    for f in files:
        for out in output_paths(out_dir, f, cfg).values():
            if seen.setdefault(out, f) != f:
                raise PredictError(f"{f} and {seen[out]} would both write {out}; predict them into separate --out")
        check_outputs(output_paths(out_dir, f, cfg), cfg.force)
    truths = _check_extras(files, class_map, out_dir, cfg)
    model = model.to(device).eval()
    check_model(model, class_map, device)
    notes = {"adapt_bn": _adapt_bn(model, files, cfg, device, progress)} if cfg.adapt_bn else {}
    vector = VectorWriter(cfg.vector, class_map.names) if cfg.vector is not None and dist.rank() == 0 else None
    summaries = []
    try:
        for f in files:
            summary = predict_file(model, class_map, f, out_dir, cfg, device, progress, vector, truths.get(f), notes)
            if summary is not None:
                summaries.append(summary)
        if vector is not None:
            vector.commit()
    except BaseException:
        if vector is not None:
            vector.abort()
        raise
    if cfg.objects is not None and summaries:
        write_summary(total_objects(summaries, cfg.objects), objects_path(out_dir, cfg.objects))
    return summaries
