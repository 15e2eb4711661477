"""``distseg bench train|scaling|infer|report``: throughput of the real training step, its scaling over processes,
inference, and a report of the recorded runs.

Only typer and the standard library are imported here; torch and deepspeed are imported inside the command bodies.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer

from distseg.stages.registry import kind_names

app = typer.Typer(help="Benchmark training and inference throughput (records go to benchmarks/results/).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

_CONFIG = typer.Option(None, "--config", help="BenchConfig YAML/JSON; options given on the line override it.")
_STAGE = typer.Option(None, "--stage", help=f"The stage kind whose step is timed: one of "
                                            f"{', '.join(kind_names())} (default ssl).")
_DATA = typer.Option(None, "--data", help="Shard folder (default: small synthetic data in a temporary folder).")
_DS = typer.Option(None, "--ds_config", "--ds-config",
                   help="DeepSpeed JSON (default ds_configs/zero1_bf16.json on CUDA, cpu_fp32.json on CPU).")
_PRECISION = typer.Option(None, "--precision", help="Override the ds_config precision: fp32, bf16 or fp16.")
_WARMUP = typer.Option(None, "--warmup", help="Untimed optimizer steps (default 5).")
_STEPS = typer.Option(None, "--steps", help="Timed optimizer steps (default 20).")
_SIZE = typer.Option(None, "--size", help="Square training crop in pixels (default 512).")
_MODEL = typer.Option(None, "--model", help="Model config YAML/JSON (a ModelConfig, or a stage.json).")
_SET = typer.Option([], "--set", help="Override any BenchConfig field, e.g. model.backbone=hrnet_w18 (repeatable).")
_WORKERS = typer.Option(None, "--workers", help="Loader worker processes per rank (default 4).")
_OUT = typer.Option(None, "--out-dir", help="Folder of bench.jsonl (default benchmarks/results).")
_DEVICE = typer.Option(None, "--device", help="'cpu' to ignore CUDA.")


def _fail(message: str) -> None:
    """Report bad input as one stderr line and exit with status 2 (the CLI convention)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _int_list(text: str, option: str) -> list[int]:
    """'4,8,16' -> [4, 8, 16]; anything else is a CLI error naming the option."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        _fail(f"{option} {text!r}: expected positive integers separated by commas, e.g. 4,8,16")
    return values


def _bench_config(config: Optional[Path], model: Optional[Path], sets: list[str], options: dict[str, Any]):
    """BenchConfig from an optional file, then the model file, then explicit options, then ``--set``."""
    from distseg.bench.config import BenchConfig
    from distseg.config import ConfigError, apply_overrides, from_dict, read_mapping, to_dict
    from distseg.models.config import load_model_config

    try:
        data = read_mapping(config) if config else {}
        if model is not None:
            data["model"] = to_dict(load_model_config(model))
        for key, value in options.items():
            if value is not None:
                data[key] = value
        return from_dict(BenchConfig, apply_overrides(data, sets), where=str(config or "bench options"))
    except (ConfigError, ValueError) as exc:
        _fail(str(exc))


def _run_here(cfg, local_rank: Optional[int]) -> None:
    """Run the sweep in this process (one rank) and print the job table on rank 0."""
    from distseg.bench.report import print_runs
    from distseg.bench.train import run_train
    from distseg.config import ConfigError
    from distseg.data.errors import DataError
    from distseg.engine.distributed import shutdown
    from distseg.stages.common import StageError

    try:
        records = run_train(cfg, local_rank)
    except (ConfigError, StageError, DataError, FileNotFoundError) as exc:
        _fail(str(exc))
    shutdown()
    if records:
        print_runs(records)
        typer.echo(f"appended {len(records)} record(s) to {Path(cfg.out_dir) / 'bench.jsonl'}")


@app.command()
def train(
    config: Optional[Path] = _CONFIG, stage: Optional[str] = _STAGE, data: Optional[str] = _DATA,
    ds_config: Optional[str] = _DS, precision: Optional[str] = _PRECISION,
    micro_batch: Optional[str] = typer.Option(None, "--micro-batch", help="Micro-batch sizes to sweep, e.g. 4,8,16 "
                                              "(default 8)."),
    warmup: Optional[int] = _WARMUP, steps: Optional[int] = _STEPS, size: Optional[int] = _SIZE,
    model: Optional[Path] = _MODEL, sets: list[str] = _SET,
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last",
                                                 help="Channels-last images into the models."),
    compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the student."),
    grad_checkpointing: Optional[bool] = typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing",
                                                      help="Activation checkpointing of the backbone."),
    unlabeled_ratio: Optional[int] = typer.Option(None, "--unlabeled-ratio", help="(ssl) Unlabelled/labelled."),
    workers: Optional[int] = _WORKERS,
    peak: Optional[float] = typer.Option(None, "--peak-tflops", help="Peak TFLOPS per GPU for MFU."),
    out_dir: Optional[str] = _OUT, tag: Optional[str] = typer.Option(None, "--tag", help="Label in the record."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="Launch this many processes through deepspeed."),
    device: Optional[str] = _DEVICE,
    local_rank: Optional[int] = typer.Option(None, "--local_rank", "--local-rank", hidden=True),
) -> None:
    """Time the real training step of a stage: images/s, step time, data-wait, memory, TFLOPS and MFU."""
    sizes = _int_list(micro_batch, "--micro-batch") if micro_batch else None
    options = {"stage": stage, "data": data, "ds_config": ds_config, "precision": precision,
               "micro_batches": sizes, "warmup": warmup, "steps": steps, "size": size, "channels_last": channels_last,
               "compile": compile_, "unlabeled_ratio": unlabeled_ratio,
               "num_workers": workers, "peak_tflops": peak, "out_dir": out_dir, "tag": tag, "device": device}
    if grad_checkpointing is not None:
        sets = [f"model.grad_checkpointing={str(grad_checkpointing).lower()}", *sets]
    cfg = _bench_config(config, model, sets, options)
    under_launcher = local_rank is not None or "LOCAL_RANK" in os.environ
    if gpus is not None and not under_launcher:
        from distseg.bench.scaling import launch_train

        if gpus < 1:
            _fail("--gpus must be >= 1")
        raise typer.Exit(launch_train(cfg, gpus))
    _run_here(cfg, local_rank)


@app.command()
def scaling(
    gpus: int = typer.Option(..., "--gpus", help="Largest process count (runs 1, 2, 4, ... and this)."),
    procs: Optional[str] = typer.Option(None, "--procs", help="Explicit process counts, e.g. 1,2,3,4."),
    config: Optional[Path] = _CONFIG, stage: Optional[str] = _STAGE, data: Optional[str] = _DATA,
    ds_config: Optional[str] = _DS, precision: Optional[str] = _PRECISION,
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Micro-batch per process (default 8)."),
    warmup: Optional[int] = _WARMUP, steps: Optional[int] = _STEPS, size: Optional[int] = _SIZE,
    model: Optional[Path] = _MODEL, sets: list[str] = _SET, workers: Optional[int] = _WORKERS,
    out_dir: Optional[str] = _OUT, device: Optional[str] = _DEVICE,
) -> None:
    """Run `bench train` at 1, 2, ... N processes (same micro-batch each) and print the efficiency table."""
    from distseg.bench.report import print_scaling
    from distseg.bench.scaling import ScalingError, default_procs, run_scaling

    counts = _int_list(procs, "--procs") if procs else default_procs(gpus)
    if gpus < 1 or max(counts) > gpus:
        _fail(f"--gpus {gpus}: must be >= 1 and cover every --procs count {counts}")
    options = {"stage": stage, "data": data, "ds_config": ds_config, "precision": precision,
               "micro_batches": [micro_batch] if micro_batch else None, "warmup": warmup, "steps": steps, "size": size,
               "num_workers": workers, "out_dir": out_dir, "device": device}
    cfg = _bench_config(config, model, sets, options)
    try:
        record = run_scaling(cfg, counts)
    except ScalingError as exc:
        _fail(str(exc))
    print_scaling(record)


@app.command()
def infer(
    model: Optional[Path] = _MODEL,
    sets: list[str] = typer.Option([], "--set", help="Override a model field, e.g. --set backbone=resnet101."),
    size: int = typer.Option(512, "--size", help="Square input size in pixels."),
    batch: int = typer.Option(8, "--batch", help="Images per forward."),
    channels_last: bool = typer.Option(False, "--channels-last/--no-channels-last"),
    precision: str = typer.Option("fp32", "--precision", help="Autocast: fp32, bf16 or fp16 (CUDA)."),
    compile_: bool = typer.Option(False, "--compile/--no-compile", help="Run through torch.compile."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda if present)."),
    warmup: int = typer.Option(3, "--warmup"), iters: int = typer.Option(10, "--iters"),
    peak: Optional[float] = typer.Option(None, "--peak-tflops", help="Peak TFLOPS of the device for MFU."),
    out_dir: str = typer.Option("benchmarks/results", "--out-dir"), tag: str = typer.Option("", "--tag"),
) -> None:
    """Inference throughput of a model (distseg bench-infer), recorded in the same shape as `bench train`."""
    from distseg.bench.infer import InferOptions, run_infer
    from distseg.bench.report import print_runs
    from distseg.models.config import load_model_config

    try:
        model_cfg = load_model_config(model, sets)
        opts = InferOptions(size=size, batch=batch, channels_last=channels_last, precision=precision,
                            compile=compile_, device=device, warmup=warmup, iters=iters, peak_tflops=peak, tag=tag)
        record = run_infer(model_cfg, opts, out_dir)
    except ValueError as exc:
        _fail(str(exc))
    print_runs([record])


@app.command()
def report(
    inputs: list[Path] = typer.Argument(None, help="bench.jsonl files or folders (default benchmarks/results)."),
    out: Path = typer.Option(Path("benchmarks/results/bench_report"), "--out",
                             help="Output stem: writes STEM.md and STEM.png."),
) -> None:
    """Render the records as a markdown table and a PNG chart (images/s by configuration, and scaling)."""
    from distseg.bench.records import read_records
    from distseg.bench.report import render

    try:
        records = read_records(inputs or [Path("benchmarks/results")])
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if not records:
        _fail("no benchmark records found; run `distseg bench train` first")
    md, png = render(records, out)
    typer.echo(f"wrote {md} and {png} ({len(records)} records)")
