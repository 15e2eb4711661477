"""``bench train``: time the real training step of a stage under the same DeepSpeed launch as training.

One process per rank runs :func:`run_train`. For each micro-batch of the sweep it builds the stage's
:class:`~distseg.stages.trainer.Trainer` exactly as a training run does (the kind's task, its DeepSpeed engine and
the streams the kind declares), wraps those streams to time the waits, and calls the loop's own
:func:`~distseg.engine.loop.train_step`. The first warm-up step is run under the FLOP counter; the timed steps are
bracketed by step marks only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from distseg.bench import fixtures
from distseg.bench.config import BenchConfig, peak_tflops
from distseg.bench.records import FIGURES, append_record, base_record
from distseg.bench.timing import (StepClock, TimedStream, count_step_flops, grad_checkpointing_off, peak_memory_gb,
                                  percentile, reset_peak_memory)
from distseg.engine.loop import train_step

@dataclasses.dataclass
class Workspace:
    """Inputs shared by every micro-batch of a run (on each node's local disk)."""

    folder: Path
    shards: str
    parent: str
    ds_config: str


@contextlib.contextmanager
def workspace(cfg: BenchConfig, env) -> Iterator[Workspace]:
    """Create the data, parent folder and ds_config once per node (local rank 0), share them, delete them after.

    The folder name comes from global rank 0 so every node uses the same path on its own disk.
    """
    from distseg.engine.distributed import barrier, broadcast_object
    from distseg.stages.registry import get_kind
    from distseg.stages.data import data_class_map

    token = broadcast_object(secrets.token_hex(6) if env.is_main else None)
    folder = Path(tempfile.gettempdir()) / f"distseg-bench-{token}"
    shards = cfg.data or str(folder / "shards")
    ws = Workspace(folder, shards, str(folder / "parent"), str(folder / "ds_config.json"))
    try:
        if env.local_rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            if not cfg.data:
                ratio = cfg.unlabeled_ratio if get_kind(cfg.stage).unlabelled else 1
                sizes = fixtures.synthetic_sizes(cfg.synthetic_images, max(cfg.micro_batches), env.world_size, ratio)
                fixtures.synthetic_shards(folder, cfg.synthetic_images, *sizes, cfg.size)
            fixtures.parent_folder(Path(ws.parent), cfg.model, data_class_map(shards))
            fixtures.write_ds_config(cfg, env.device.type, folder)
        barrier()
        yield ws
    finally:
        barrier()
        if env.local_rank == 0:
            shutil.rmtree(folder, ignore_errors=True)


def use_channels_last_inputs(trainer) -> None:
    """Feed the student and teacher channels-last images (``--channels-last``, whatever the ds_config says)."""
    from distseg.engine.deepspeed_engine import channels_last_inputs

    for model in (trainer.engine.module, getattr(trainer.task, "teacher", None)):
        if model is not None:
            channels_last_inputs(model)


def stage_step(trainer, env) -> tuple[Callable[[], Any], list[TimedStream]]:
    """The stage's whole training step as a callable (the loop's own ``train_step`` on the trainer's task, engine and
    streams), and those streams, wrapped to time the waits on the loader."""
    trainer.data.streams = {name: TimedStream(s) for name, s in trainer.data.streams.items()}

    def step():
        return train_step(trainer.task, trainer.engine, trainer.data.streams, env.device, guard=trainer.guard)

    return step, list(trainer.data.streams.values())


def time_steps(trainer, cfg: BenchConfig, env, progress=None) -> dict[str, Any]:
    """Warm up (first step under the FLOP counter), then time ``cfg.steps`` steps; this rank's raw figures."""
    step, streams = stage_step(trainer, env)
    reset_peak_memory(env.device)
    with grad_checkpointing_off(trainer.engine.module):
        flops = count_step_flops(step)
    if cfg.compile:
        trainer.engine.compile(backend=cfg.compile_backend)
    task = progress.add_task("warm-up", total=cfg.warmup + cfg.steps, completed=1) if progress else None
    for _ in range(cfg.warmup - 1):
        step()
        if progress:
            progress.advance(task)
    clock = StepClock(env.device)
    clock.start()
    for s in streams:
        s.waited = 0.0
    for _ in range(cfg.steps):
        step()
        clock.mark()
        if progress:
            progress.update(task, advance=1, description="timed")
    clock.stop()
    return {"step_seconds": clock.step_seconds(), "wall": clock.wall_seconds, "flops": flops,
            "waited": sum(s.waited for s in streams), "peak_gb": peak_memory_gb(env.device)}


def summarize(ranks: list[dict[str, Any]], *, global_batch: int, unlabeled_batch: int, device_name: str,
              precision: str, device_type: str, peak_override: float | None) -> dict[str, Any]:
    """Job figures from every rank's raw figures: a step lasts as long as its slowest rank."""
    world = len(ranks)
    steps = len(ranks[0]["step_seconds"])
    per_step = [max(r["step_seconds"][i] for r in ranks) for i in range(steps)]
    wall = max(r["wall"] for r in ranks)
    flops_rank = sum(r["flops"] for r in ranks) / world
    tflops = flops_rank * steps / wall / 1e12
    peak = None
    if device_type == "cuda":
        peak = peak_override or peak_tflops(device_name, precision)
    ips = global_batch * steps / wall
    return {
        "images_per_s": ips, "images_per_s_per_gpu": ips / world,
        "unlabeled_images_per_s": unlabeled_batch * steps / wall if unlabeled_batch else None,
        "step_time_s": {"median": percentile(per_step, 50), "p90": percentile(per_step, 90),
                        "mean": sum(per_step) / steps},
        "data_wait_fraction": sum(r["waited"] / r["wall"] for r in ranks) / world,
        "data_wait_fraction_max": max(r["waited"] / r["wall"] for r in ranks),
        "peak_memory_gb": [round(r["peak_gb"], 3) for r in ranks],
        "flops_per_step": int(flops_rank * world), "tflops_per_gpu": tflops, "tflops_total": tflops * world,
        "peak_tflops": peak, "mfu": tflops / peak if peak else None,
    }


def record_config(cfg: BenchConfig, micro_batch: int, ds_cfg: dict) -> dict[str, Any]:
    """What identifies a configuration across runs and world sizes (not where results go, not the label)."""
    from distseg.config import to_dict

    bench = {k: v for k, v in to_dict(cfg).items() if k not in ("out_dir", "tag", "micro_batches")}
    return {"bench": bench, "micro_batch": micro_batch, "ds_config": ds_cfg}


def measure(cfg: BenchConfig, ws: Workspace, env, micro_batch: int, progress=None) -> dict[str, Any] | None:
    """Build the stage at ``micro_batch``, time it, and return the job record on rank 0 (None elsewhere)."""
    from distseg.engine.dsconfig import load_ds_config, precision
    from distseg.stages.registry import get_kind
    from distseg.stages.trainer import Trainer

    stage_cfg = fixtures.stage_config(cfg, shards=ws.shards, parent=ws.parent, ds_config=ws.ds_config,
                                      run_dir=str(ws.folder / "run"), micro_batch=micro_batch,
                                      world_size=env.world_size)
    trainer = Trainer(get_kind(cfg.stage), stage_cfg, env)
    try:  # a size that ran out of memory too gives its memory back before the next size is built
        if cfg.channels_last:
            use_channels_last_inputs(trainer)
        raw = time_steps(trainer, cfg, env, progress)
        mode, ds_resolved = precision(trainer.ds_cfg), trainer.ds_cfg
        reads_pool = "unlabelled" in trainer.data.streams and "labelled" in trainer.data.streams
    finally:
        trainer.close()
    del trainer
    ranks = _gather(raw)
    if not env.is_main:
        return None
    record = base_record("train", record_config(cfg, micro_batch, load_ds_config(ws.ds_config)), env.device)
    unl = micro_batch * cfg.unlabeled_ratio * env.world_size if reads_pool else 0
    figures = summarize(ranks, global_batch=micro_batch * env.world_size, unlabeled_batch=unl,
                        device_name=record["device"]["name"], precision=mode, device_type=env.device.type,
                        peak_override=cfg.peak_tflops)
    record.update(status="ok", stage=cfg.stage, tag=cfg.tag, world_size=env.world_size, micro_batch=micro_batch,
                  global_batch=micro_batch * env.world_size, precision=mode, size=cfg.size,
                  backbone=cfg.model.backbone, warmup=cfg.warmup, steps=cfg.steps, ds_config_resolved=ds_resolved,
                  **figures)
    return record


def _gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (after the timed region, so its cost is not measured)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def oom_record(cfg: BenchConfig, ws: Workspace, env, micro_batch: int, error: str) -> dict[str, Any]:
    """The record of a micro-batch that did not fit: provenance and the error, no figures."""
    from distseg.engine.dsconfig import load_ds_config

    record = base_record("train", record_config(cfg, micro_batch, load_ds_config(ws.ds_config)), env.device)
    record.update(status="oom", error=error, stage=cfg.stage, tag=cfg.tag, world_size=env.world_size,
                  micro_batch=micro_batch, global_batch=micro_batch * env.world_size, size=cfg.size,
                  backbone=cfg.model.backbone, **{k: None for k in FIGURES})
    return record


def _progress(env):
    """A rich progress display on rank 0; nothing elsewhere."""
    if not env.is_main:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), transient=True)


def run_train(cfg: BenchConfig, local_rank: int | None = None) -> list[dict[str, Any]]:
    """Sweep ``cfg.micro_batches`` (ascending) on this rank; rank 0 appends and returns one record per size.

    A CUDA out-of-memory error ends the sweep with an ``oom`` record (all ranks run the same shapes, so they fail
    together). On CPU memory exhaustion is fatal to the process and cannot be caught. The process group is left
    initialised, as :func:`~distseg.stages.trainer.run_stage` leaves it: the command ends it
    (:func:`~distseg.engine.distributed.shutdown`).
    """
    from distseg.engine.distributed import init_distributed

    env = init_distributed(local_rank, cfg.device)
    records: list[dict[str, Any]] = []
    with workspace(cfg, env) as ws, _progress(env) as progress:
        for micro_batch in sorted(set(cfg.micro_batches)):
            record, fits = _measure_or_oom(cfg, ws, env, micro_batch, progress)
            if record is not None:
                append_record(cfg.out_dir, record)
                records.append(record)
            if not fits:
                break
    return records


def _measure_or_oom(cfg: BenchConfig, ws: Workspace, env, micro_batch: int, progress) -> tuple[dict | None, bool]:
    """(record on rank 0, whether it fitted); CUDA memory is released before the next size is built."""
    oom = (torch.cuda.OutOfMemoryError,) if env.device.type == "cuda" else ()
    error = None
    try:
        record = measure(cfg, ws, env, micro_batch, progress)
    except oom as exc:
        error = str(exc).splitlines()[0]
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    if error is None:
        return record, True
    return (oom_record(cfg, ws, env, micro_batch, error) if env.is_main else None), False
