"""Training-step cost on CPU, in one run, through ``distseg bench`` (the real stage step under a real launch).

1. **Scaling**: the distill step at 1 vs 2 processes (one thread each, same micro-batch per process); efficiency =
   per-process images/s at 2 ÷ at 1. Target ≥ 0.85 (on a dedicated 2-core machine).
2. **KD + EWC vs supervised**: the distill step (student forward/backward + frozen teacher forward + KD + EWC)
   against the same stage with ``distill.alpha=0, distill.ewc_lambda=0`` (no teacher forward at all, i.e. plain
   supervised training). Target ≤ 1.5× the supervised step time. Runs alternate A, B, A, B to share the machine's
   noise evenly.

    python benchmarks/bench_train.py [--backbone hrnet_w18_small] [--size 128] [--micro-batch 4] [--repeats 2]

Results are printed and saved to benchmarks/results/train.json (records also go to bench.jsonl).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import statistics
import tempfile
from pathlib import Path

from distseg.bench.config import BenchConfig
from distseg.bench.records import RECORDS_FILE, read_records
from distseg.bench.scaling import launch_train, run_scaling
from distseg.models import ModelConfig

RESULTS = Path(__file__).resolve().parent / "results" / "train.json"
SUPERVISED = ("distill.alpha=0", "distill.ewc_lambda=0")


def _records(out_dir: str, tag: str) -> list[dict]:
    return [r for r in read_records([Path(out_dir) / RECORDS_FILE]) if r.get("tag") == tag and r["status"] == "ok"]


def kd_ewc_vs_supervised(base: BenchConfig, repeats: int) -> dict:
    """Median step time of the distill step with and without its teacher/KD/EWC terms, interleaved runs."""
    times: dict[str, list[float]] = {"kd_ewc": [], "supervised": []}
    for _ in range(repeats):
        for name, sets in (("kd_ewc", ()), ("supervised", SUPERVISED)):
            tag = f"{name}-{secrets.token_hex(4)}"
            if launch_train(dataclasses.replace(base, stage_set=sets, tag=tag), 1) != 0:
                raise SystemExit(f"bench train ({name}) failed")
            times[name].append(_records(base.out_dir, tag)[0]["step_time_s"]["median"])
    kd, sup = statistics.median(times["kd_ewc"]), statistics.median(times["supervised"])
    return {"step_time_kd_ewc_s": kd, "step_time_supervised_s": sup, "ratio": kd / sup, "target": "<= 1.5",
            "runs": times}


def scaling(base: BenchConfig) -> dict:
    """Distill step at 1 and 2 processes: the scaling-efficiency row of ``bench scaling``."""
    rows = run_scaling(dataclasses.replace(base, tag=f"scaling-{secrets.token_hex(4)}"), [1, 2])["rows"]
    return {"rows": rows, "efficiency": rows[-1]["efficiency"], "target": ">= 0.85"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="hrnet_w18_small")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as out_dir:
        base = BenchConfig(stage="distill", device="cpu", size=args.size, micro_batches=(args.micro_batch,),
                           warmup=3, steps=args.steps, num_workers=1, out_dir=out_dir,
                           model=ModelConfig(backbone=args.backbone, psa="parallel"))
        results = {"config": {"backbone": args.backbone, "size": args.size, "micro_batch": args.micro_batch,
                              "threads_per_process": int(os.environ["OMP_NUM_THREADS"]), "cpu_count": os.cpu_count()},
                   "scaling": scaling(base), "kd_ewc_vs_supervised": kd_ewc_vs_supervised(base, args.repeats)}
    print(f"scaling 1 -> 2 processes: efficiency {results['scaling']['efficiency']:.2f} (target >= 0.85)")
    r = results["kd_ewc_vs_supervised"]
    print(f"KD+EWC step {r['step_time_kd_ewc_s']:.3f}s vs supervised {r['step_time_supervised_s']:.3f}s: "
          f"{r['ratio']:.2f}x (target <= 1.5x)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
