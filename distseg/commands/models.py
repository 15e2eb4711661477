"""``distseg flops`` and ``distseg bench-infer``: what a model costs, counted and timed.

Only typer and the standard library are imported here; torch, timm and the model code are imported
inside the command bodies so ``distseg --help`` stays instant.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

_MODEL_HELP = ("Model config (YAML/JSON): a model config mapping (any registered architecture; DeepLabV3+ unless it "
               "names another), a mapping with a 'model' key, or a stage.json. Without it the defaults (HRNetV2-W48 + "
               "PSA) are used.")
_SET_HELP = "Override a model field, e.g. --set backbone=resnet101 --set psa=none (repeatable)."
_FLOP_NOTE = ("FLOPs = 2 x MACs: torch.utils.flop_counter counts each multiply-add of a conv or matmul as 2 FLOPs "
              "and skips element-wise ops (norms, activations, interpolation).")


def _fail(message: str) -> None:
    """Report bad input as one stderr line and exit with status 2 (the CLI convention)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _config(model: Optional[Path], overrides: list[str]):
    """Resolve the segmenter's config, turning config errors into the CLI's one-line failure."""
    import dataclasses

    from distseg.models.architectures import require_segmenter
    from distseg.models.config import load_model_config

    try:
        cfg = load_model_config(model, overrides)
        require_segmenter(cfg, str(model))
    except (ValueError, KeyError) as exc:
        _fail(str(exc))
    # cost and speed do not depend on the weights
    return dataclasses.replace(cfg, pretrained=None) if hasattr(cfg, "pretrained") else cfg


def _label(cfg) -> str:
    """How tables name the model: the backbone and PSA layout for DeepLabV3+, the architecture's label otherwise."""
    from distseg.models.architectures import architecture_of

    label = architecture_of(cfg).describe(cfg)
    return f"{label} + DeepLabV3+ (psa={cfg.psa})" if cfg.architecture == "deeplabv3plus" else label


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))


def flops(
    model: Optional[Path] = typer.Option(None, "--model", help=_MODEL_HELP),
    overrides: list[str] = typer.Option([], "--set", help=_SET_HELP),
    size: int = typer.Option(512, "--size", help="Square input size in pixels."),
    batch: int = typer.Option(8, "--batch", help="Also report the cost of a batch of this many images."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the figures to this JSON file."),
) -> None:
    """Parameters and forward GMACs / GFLOPs per image and per batch (counted on the meta device)."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from distseg.config import to_dict
    from distseg.models import build_model
    from distseg.models.profile import count_flops, count_params

    if size < 1 or batch < 1:
        _fail("--size and --batch must be positive")
    cfg = _config(model, overrides)
    with torch.device("meta"):
        net = build_model(cfg)
    one, many = count_flops(net, size, batch=1), count_flops(net, size, batch=batch)
    params = count_params(net)
    table = Table(title=f"{_label(cfg)} at {size}x{size}")
    for col in ("", "params (M)", "GMACs", "GFLOPs"):
        table.add_column(col, justify="right")
    table.add_row("per image", f"{params / 1e6:.2f}", f"{one['gmacs']:.1f}", f"{one['gflops']:.1f}")
    table.add_row(f"per batch of {batch}", "", f"{many['gmacs']:.1f}", f"{many['gflops']:.1f}")
    console = Console()
    console.print(table)
    console.print(_FLOP_NOTE)
    if json_out is not None:
        _write_json(json_out, {"model": to_dict(cfg), "size": size, "params": params, "per_image": one,
                               "per_batch": many, "note": _FLOP_NOTE})


def bench_infer(
    model: Optional[Path] = typer.Option(None, "--model", help=_MODEL_HELP),
    overrides: list[str] = typer.Option([], "--set", help=_SET_HELP),
    size: int = typer.Option(512, "--size", help="Square input size in pixels."),
    batch: int = typer.Option(8, "--batch", help="Batch N, timed after batch 1."),
    channels_last: bool = typer.Option(False, "--channels-last/--no-channels-last", help="Channels-last memory."),
    dtype: str = typer.Option("fp32", "--dtype", help="Autocast dtype: fp32, bf16 (CPU/CUDA) or fp16 (CUDA)."),
    compile_: bool = typer.Option(False, "--compile/--no-compile", help="Run through torch.compile."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed forwards before timing each batch size."),
    iters: int = typer.Option(10, "--iters", help="Timed forwards per batch size."),
    out: Path = typer.Option(Path("bench_infer.json"), "--out", help="JSON file for the results."),
) -> None:
    """Inference images/s at batch 1 and batch N (random weights; speed does not depend on them)."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from distseg.config import to_dict
    from distseg.models import build_model
    from distseg.models.profile import bench_infer as run_bench

    cfg = _config(model, overrides)
    try:
        torch.device(device)
    except RuntimeError as exc:
        _fail(f"--device {device!r}: {exc}")
    batches = sorted({1, batch})
    console = Console()
    try:
        with console.status(f"timing {_label(cfg)} at {size}x{size} on {device}"):
            rows = run_bench(build_model(cfg), size, batches, channels_last=channels_last, dtype=dtype,
                             compile=compile_, device=device, warmup=warmup, iters=iters)
    except ValueError as exc:
        _fail(str(exc))
    table = Table(title=f"{_label(cfg)} {size}x{size}, {device}, {dtype}, "
                        f"channels_last={channels_last}, compile={compile_}")
    for col in ("batch", "ms / batch", "images / s"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(str(row["batch"]), f"{row['ms_per_batch']:.1f}", f"{row['images_per_s']:.2f}")
    console.print(table)
    _write_json(out, {"model": to_dict(cfg), "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "results": rows})
    console.print(f"saved {out}")
