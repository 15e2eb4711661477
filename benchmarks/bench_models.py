"""Model cost: params, GMACs and CPU images/s per backbone with and without PSA, in one run.

    python benchmarks/bench_models.py --backbones hrnet_w18_small,resnet18 --sizes 256,512
    python benchmarks/bench_models.py --backbones study --sizes 512 --iters 2   # the model-card rows

For every backbone and size, the same DeepLabV3+ is built without PSA and with PSA (``--psa`` layout, on
the ASPP input as in the study), its forward MACs are counted on the meta device, and its CPU
throughput at batch 1 is timed, alternating the two models and keeping each one's best of
``--repeats`` (``--no-speed`` skips timing). PSA's overhead is reported as ratios
with / without (MACs and images/s). Results go to ``benchmarks/results/models.csv``.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from distseg.models import BACKBONES, ModelConfig, build_model
from distseg.models.profile import bench_infer, count_flops, count_params

RESULTS = Path(__file__).resolve().parent / "results"
STUDY = "hrnet_w48,resnet101,resnext101_32x8d,xception71"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="hrnet_w18_small,resnet18",
                        help=f"comma-separated registry keys, or 'study' ({STUDY})")
    parser.add_argument("--sizes", default="256,512", help="comma-separated square input sizes")
    parser.add_argument("--psa", default="parallel", choices=["parallel", "sequential"], help="PSA layout")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards per measurement")
    parser.add_argument("--iters", type=int, default=1, help="timed forwards per measurement (batch 1)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements; the best is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-speed", action="store_true", help="count params and MACs only")
    parser.add_argument("--out", type=Path, default=RESULTS / "models.csv", help="CSV to write")
    args = parser.parse_args(argv)
    args.backbones = (STUDY if args.backbones == "study" else args.backbones).split(",")
    unknown = [b for b in args.backbones if b not in BACKBONES]
    if unknown:
        parser.error(f"unknown backbones {unknown}; registered: {sorted(BACKBONES)}")
    args.sizes = [int(s) for s in args.sizes.split(",")]
    return args


def _best_speed(models: list[torch.nn.Module], size: int, args: argparse.Namespace) -> list[float]:
    """Best-of-``repeats`` images/s at batch 1 for each model, timed in alternation.

    Alternating A, B, A, B ... and keeping each model's best run makes the ratio robust to other work
    on a shared machine, which only ever slows a run down.
    """
    best = [0.0] * len(models)
    for model in models:
        bench_infer(model, size, batch_sizes=(1,), warmup=args.warmup, iters=1)
    for _ in range(args.repeats):
        for i, model in enumerate(models):
            (row,) = bench_infer(model, size, batch_sizes=(1,), warmup=0, iters=args.iters)
            best[i] = max(best[i], row["images_per_s"])
    return best


def _measure(backbone: str, args: argparse.Namespace) -> list[dict]:
    """Rows for one backbone without and with PSA: params, MACs (meta device), CPU images/s."""
    cfgs = [ModelConfig(backbone=backbone, psa=p, num_classes=6) for p in ("none", args.psa)]
    with torch.device("meta"):
        metas = [build_model(cfg) for cfg in cfgs]
    models = [] if args.no_speed else [build_model(cfg) for cfg in cfgs]
    rows = []
    for size in args.sizes:
        speeds = _best_speed(models, size, args) if models else [None, None]
        for cfg, meta, speed in zip(cfgs, metas, speeds):
            cost = count_flops(meta, size)
            rows.append({"backbone": backbone, "psa": cfg.psa, "size": size, "params_m": count_params(meta) / 1e6,
                         "gmacs": cost["gmacs_per_image"], "gflops": cost["gflops_per_image"],
                         "cpu_images_per_s": speed})
    return rows


def _with_ratios(rows: list[dict]) -> list[dict]:
    """Add PSA's overhead to every row: with / without, for MACs and for images/s."""
    base = {(r["backbone"], r["size"]): r for r in rows if r["psa"] == "none"}
    for row in rows:
        ref = base[(row["backbone"], row["size"])]
        row["psa_macs_ratio"] = row["gmacs"] / ref["gmacs"]
        speed = row["cpu_images_per_s"]
        row["psa_speed_ratio"] = speed / ref["cpu_images_per_s"] if speed else None
    return rows


def _print(rows: list[dict], console: Console) -> None:
    table = Table(title="DeepLabV3+ cost per image (GFLOPs = 2 x GMACs), CPU batch 1")
    for col in ("backbone", "psa", "size", "params (M)", "GMACs", "CPU img/s", "PSA MACs x", "PSA speed x"):
        table.add_column(col, justify="right")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        table.add_row(r["backbone"], r["psa"], str(r["size"]), fmt(r["params_m"], ".2f"), fmt(r["gmacs"], ".2f"),
                      fmt(r["cpu_images_per_s"], ".3f"), fmt(r["psa_macs_ratio"], ".3f"),
                      fmt(r["psa_speed_ratio"], ".3f"))
    console.print(table)


def main(argv: list[str] | None = None) -> list[dict]:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for backbone in track(args.backbones, description="building and timing"):
        rows += _measure(backbone, args)
    rows = _with_ratios(rows)
    console = Console(width=max(Console().width, 110))
    _print(rows, console)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "threads", "torch"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "threads": torch.get_num_threads(), "torch": torch.__version__})
    console.print(f"saved {args.out}")
    return rows


if __name__ == "__main__":
    main()
