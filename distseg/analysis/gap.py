"""``distseg domain-gap`` as a library call: sample, stream, measure, rank, write.

:func:`analyse` returns a :class:`GapResult` (and writes nothing); :func:`distseg.analysis.report.write_report`
turns it into the table, the CSV, the JSON and the picture.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from distseg.analysis import GapError
from distseg.analysis.labels import class_shares, label_overlap, load_synonyms
from distseg.analysis.measures import (color_distance, frechet_distance, median_bandwidth, mmd_test, size_gap,
                                       wasserstein_1d)
from distseg.analysis.ranking import SIGNALS, Ranking, rank
from distseg.analysis.sources import Dataset, open_dataset, parse_spec, parse_splits
from distseg.analysis.stats import DatasetStats, collect


@dataclasses.dataclass
class GapConfig:
    """What to compare and how."""

    target: str
    """Shard folder of the target (``FOLDER`` or ``FOLDER@split,split``)."""
    candidates: list[str]
    """Shard folders of the candidate intermediate datasets, same syntax."""
    encoder: str = "imagenet"
    """``imagenet`` (the ``backbone`` entry with its ImageNet weights) or a finished stage folder."""
    backbone: str = "efficientnet_lite0"
    """Registry key of the ImageNet encoder (ignored for a stage folder)."""
    split: str = "train,unlabeled"
    """Splits read from every folder without an ``@`` (those present; a folder with none of them is an error)."""
    tiles: int = 500
    """At most this many tiles per dataset, drawn by a hash of (seed, key)."""
    seed: int = 0
    """Seed of the tile sample, the permutations and the embedding."""
    size: int = 224
    """Encoder input side: each tile's valid region is centre-cropped to size×size; smaller tiles feed only the
    histograms."""
    batch_size: int = 16
    """Tiles per encoder forward."""
    permutations: int = 200
    """Permutations of the MMD test (p-values are multiples of 1 / (permutations + 1))."""
    embed_tiles: int = 300
    """Tiles per dataset in the 2-D embedding picture."""
    candidate_models: list[str] = dataclasses.field(default_factory=list)
    """Stage folders of models trained on each candidate, in candidate order ('-' for none): enables LogME."""
    label_split: str = "train"
    """Split of the target whose labels LogME scores."""
    logme_pixels: int = 32
    """Labelled positions sampled per target tile for LogME."""
    synonyms: str | None = None
    """YAML/JSON synonym table (canonical: [names]) replacing the built-in one."""
    device: str = "cpu"
    """Torch device of the encoder and the candidate models."""
    threads: int = 0
    """CPU threads for torch (0: torch's default). On a machine shared with other jobs, fewer threads than cores
    avoids oversubscription, which can slow convolutions several-fold."""

    def __post_init__(self) -> None:
        from distseg.models.backbones import BACKBONES

        if not self.candidates:
            raise GapError("give at least one candidate")
        if self.backbone not in BACKBONES:
            raise GapError(f"--backbone {self.backbone!r} is not registered; choose one of {sorted(BACKBONES)}")
        if self.tiles < 2 or self.batch_size < 1 or self.permutations < 1 or self.logme_pixels < 1:
            raise GapError("tiles must be >= 2, and batch_size, permutations and logme_pixels >= 1")
        if self.embed_tiles < 0 or self.threads < 0:
            raise GapError(f"embed_tiles and threads must be >= 0, got {self.embed_tiles} and {self.threads}")
        if self.candidate_models and len(self.candidate_models) != len(self.candidates):
            raise GapError(f"--candidate-models gives {len(self.candidate_models)} stage folders for "
                           f"{len(self.candidates)} candidates (use '-' for a candidate without a model)")


@dataclasses.dataclass
class GapResult:
    """Everything the report shows."""

    config: GapConfig
    encoder: str
    datasets: dict[str, dict[str, Any]]
    """name -> folder, splits, available / sampled / encoded / too-small tiles, labelled classes."""
    measures: dict[str, dict[str, Any]]
    """candidate -> signal values (see ``ranking.SIGNALS``) plus details (per-depth FD, p-value, shared classes)."""
    ranking: Ranking
    stats: dict[str, DatasetStats]
    timing: dict[str, float]


def _unique_names(datasets: list[Dataset]) -> None:
    """Make display names unique by prefixing the parent folder where two coincide; one dataset twice is an error."""
    names = [d.name for d in datasets]
    for d in datasets:
        if names.count(d.name) > 1:
            d.name = f"{d.folder.resolve().parent.name}/{d.name}"
    seen: dict[str, Dataset] = {}
    for d in datasets:
        if d.name in seen:
            raise GapError(f"{d.folder}: given twice (as {seen[d.name].folder} too); list each dataset once")
        seen[d.name] = d


def _check_tile_size(ds: Dataset, size: int, stride: int) -> None:
    """Tiled shards say their tile side: smaller than the encoder input means no tile can be encoded."""
    tile = ds.manifest.get("options", {}).get("tile")
    if isinstance(tile, int) and tile < size:
        hint = f"; pass --size {tile // stride * stride}" if tile >= 2 * stride else ""
        raise GapError(f"{ds.folder}: its tiles are {tile} px, smaller than the encoder input {size}{hint}")


def _feature_measures(t: DatasetStats, c: DatasetStats, bandwidth: float, cfg: GapConfig) -> dict[str, Any]:
    """Per-depth Fréchet distances (raw and relative to the target's total variance) and the MMD test."""
    raw, rel = [], []
    for mt, mc in zip(t.moments, c.moments):
        fd = frechet_distance(mt.mean(), mt.cov(), mc.mean(), mc.cov())
        raw.append(fd)
        rel.append(fd / max(float(np.trace(mt.cov())), 1e-12))
    mmd = mmd_test(t.embeddings, c.embeddings, bandwidth, cfg.permutations, cfg.seed)
    return {"fd": float(np.mean(rel)), "fd_depths": rel, "fd_raw": raw, "mmd": mmd.mmd2, "mmd_p": mmd.p_value}


def _measure(target: Dataset, t: DatasetStats, cand: Dataset, c: DatasetStats, bandwidth: float,
             cfg: GapConfig, lookup: dict[str, str]) -> dict[str, Any]:
    """Every signal of one candidate against the target."""
    out = _feature_measures(t, c, bandwidth, cfg)
    out.update(color=color_distance(t.color, c.color), texture=wasserstein_1d(t.texture, c.texture),
               size=size_gap(t.sizes, c.sizes), labels=None, shared=None, logme=None)
    pt, pc = class_shares(target.manifest, target.splits), class_shares(cand.manifest, cand.splits)
    if pt is not None and pc is not None:
        lo = label_overlap(pt, pc, lookup)
        out.update(labels=lo.overlap, shared=list(lo.shared), target_only=list(lo.target_only),
                   candidate_only=list(lo.candidate_only))
    return out


def _labelled_target(cfg: GapConfig) -> Dataset | None:
    """The target's labelled tiles for LogME, when candidate models are given; their folders are checked too."""
    from distseg.engine.checkpoint import WEIGHTS, CheckpointError, read_stage

    stages = [m for m in cfg.candidate_models if m != "-"]
    if not stages:
        return None
    for stage in stages:
        read_stage(stage)
        if not (Path(stage) / WEIGHTS).is_file():
            raise CheckpointError(f"{Path(stage) / WEIGHTS}: weights missing (stage not finished?)")
    folder = parse_spec(cfg.target, ())[0]  # the folder without any @splits
    return open_dataset(f"{folder}@{cfg.label_split}", (), cfg.tiles, cfg.seed)


def _transfer(cfg: GapConfig, labelled: Dataset, measures: dict[str, dict[str, Any]], names: list[str]) -> None:
    """LogME of the target's labels on each candidate model that was given (fills ``logme``)."""
    from distseg.analysis.transfer import transferability
    from distseg.data.classes import ClassMap

    ignore = ClassMap.from_manifest(labelled.folder).ignore_index
    for name, stage in zip(names, cfg.candidate_models):
        if stage != "-":
            value, pixels = transferability(stage, labelled, ignore, cfg.logme_pixels, cfg.seed, cfg.device)
            measures[name].update(logme=value, logme_pixels=pixels)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    transient=True)


def _stream_all(datasets: list[Dataset], encoder, cfg: GapConfig, progress: bool) -> dict[str, DatasetStats]:
    """One pass per dataset, with a progress bar per dataset; each needs 2 encoded tiles for the measures."""
    stats: dict[str, DatasetStats] = {}
    with _progress() if progress else contextlib.nullcontext() as bar:
        for ds in datasets:
            task = bar.add_task(ds.name, total=ds.sampled) if bar else None
            stats[ds.name] = collect(ds, encoder, cfg.size, cfg.batch_size,
                                     (lambda: bar.advance(task)) if bar else None)
            if stats[ds.name].encoded < 2:
                raise GapError(f"{ds.folder}: fewer than 2 of its {ds.sampled} sampled tiles are at least "
                               f"{cfg.size}×{cfg.size} px (the encoder input); pass a smaller --size")
    return stats


def analyse(cfg: GapConfig, progress: bool = False) -> GapResult:
    """Run the whole analysis; input errors (folders, splits, sizes, encoder) are raised before the feature pass."""
    start, cpu = time.perf_counter(), time.process_time()
    with thread_limit(cfg.threads):
        result = _analyse(cfg, progress)
    result.timing.update(wall_s=time.perf_counter() - start, cpu_s=time.process_time() - cpu)
    return result


@contextlib.contextmanager
def thread_limit(threads: int):
    """Cap torch's and the BLAS libraries' threads (numpy's eigh through an oversubscribed OpenBLAS can be 40× slower
    than single-threaded on a busy machine); 0 leaves both alone."""
    if not threads:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(threads):
            yield
    finally:
        torch.set_num_threads(before)


def _analyse(cfg: GapConfig, progress: bool) -> GapResult:
    from distseg.analysis.encoder import build_encoder

    splits = parse_splits(cfg.split)
    datasets = [open_dataset(s, splits, cfg.tiles, cfg.seed) for s in (cfg.target, *cfg.candidates)]
    _unique_names(datasets)
    lookup = load_synonyms(cfg.synonyms)
    labelled = _labelled_target(cfg)
    encoder = build_encoder(cfg.encoder, cfg.backbone, cfg.device)
    encoder.check_size(cfg.size)
    for ds in datasets:
        _check_tile_size(ds, cfg.size, max(encoder.reductions))
    pass_start, pass_cpu = time.perf_counter(), time.process_time()
    stats = _stream_all(datasets, encoder, cfg, progress)
    pass_s, pass_cpu = time.perf_counter() - pass_start, time.process_time() - pass_cpu
    target, t = datasets[0], stats[datasets[0].name]
    bandwidth = median_bandwidth(t.embeddings)
    measures = {ds.name: _measure(target, t, ds, stats[ds.name], bandwidth, cfg, lookup) for ds in datasets[1:]}
    if labelled is not None:
        _transfer(cfg, labelled, measures, [ds.name for ds in datasets[1:]])
    ranking = rank({n: {sig.name: m.get(sig.name) for sig in SIGNALS} for n, m in measures.items()})
    info = {ds.name: {"folder": str(ds.folder), "splits": list(ds.splits), "available": ds.available,
                      "sampled": stats[ds.name].sampled, "encoded": stats[ds.name].encoded,
                      "too_small": stats[ds.name].small} for ds in datasets}
    tiles = sum(s.sampled for s in stats.values())
    timing = {"tiles": tiles, "feature_pass_s": pass_s, "feature_pass_cpu_s": pass_cpu,
              "tiles_per_s": tiles / max(pass_s, 1e-9), "threads": _threads(), "mmd_bandwidth": bandwidth}
    return GapResult(cfg, encoder.description, info, measures, ranking, stats, timing)


def _threads() -> int:
    import torch

    return torch.get_num_threads()
