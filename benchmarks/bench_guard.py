"""What non-finite safety costs per training step: the same real step with the guard on and off, in one run.

The guard adds, per optimizer step, a copy of the student's buffers, one fused norm over the gradients, one
all-reduce of one number (a no-op on one process) and one host read; the SSL kind's EMA adds one fused norm over the
student and one more host read. ``on`` is ``distseg.engine.loop.train_step`` as the loop runs it; ``off`` is the
same step with the optimizer's guard removed, no buffer copy, and the EMA's finite check off. Steps alternate
on, off, on, ... so a shared machine's load falls on both alike. Results: benchmarks/results/guard.json.

    python benchmarks/bench_guard.py [--kinds finetune,ssl] [--backbone hrnet_w18_small] [--size 128] [--repeats 10]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "guard.json"


def trainer_for(kind: str, folder: Path, backbone: str, size: int, micro_batch: int):
    """A real one-process CPU Trainer of ``kind`` on synthetic shards, started from a random parent stage."""
    from distseg.bench import fixtures
    from distseg.config import from_dict
    from distseg.data.classes import ClassMap
    from distseg.engine.distributed import init_distributed
    from distseg.models import ModelConfig
    from distseg.stages.config import StageConfig
    from distseg.stages.registry import get_kind
    from distseg.stages.trainer import Trainer

    labelled, unlabelled = fixtures.synthetic_sizes(16, micro_batch, 1, 1)
    shards = fixtures.synthetic_shards(folder, 16, labelled, unlabelled, size)
    parent = fixtures.parent_folder(folder / "parent", ModelConfig(backbone=backbone, psa="parallel"),
                                    ClassMap.from_manifest(shards))
    cfg = from_dict(StageConfig, {
        "kind": kind, "out": str(folder / kind), "parent": str(parent), "ds_config": "ds_configs/cpu_fp32.json",
        "micro_batch": micro_batch, "grad_accum": 1, "global_batch": micro_batch,
        "data": {"shards": str(shards), "stream": {"num_workers": 1, "augment": {"crop_size": size}}},
        "train": {"steps": 1000, "fisher_batches": 0}})
    return Trainer(get_kind(kind), cfg, init_distributed(device="cpu"))


def bench_kind(kind: str, backbone: str, size: int, micro_batch: int, repeats: int) -> dict:
    """Median seconds of the guarded and the unguarded step of one kind, and the guard's share of the step."""
    from distseg.engine.loop import train_step

    with tempfile.TemporaryDirectory(prefix=f"bench-guard-{kind}-") as tmp:
        trainer = trainer_for(kind, Path(tmp), backbone, size, micro_batch)
        optimizer = trainer.engine.optimizer
        ema = getattr(trainer.task, "ema", None)

        def step(on: bool) -> float:
            optimizer.guard = trainer.guard if on else None
            if ema is not None:
                ema.skip_nonfinite = on
            start = time.perf_counter()
            train_step(trainer.task, trainer.engine, trainer.data.streams, trainer.env.device,
                       guard=trainer.guard if on else None)
            return time.perf_counter() - start

        step(True), step(False)  # warm-up
        times = {"on": [], "off": []}
        for _ in range(repeats):
            times["on"].append(step(True))
            times["off"].append(step(False))
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    return {"kind": kind, "backbone": backbone, "size": size, "micro_batch": micro_batch, "repeats": repeats,
            "on_median_s": on, "off_median_s": off, "on_min_s": min(times["on"]), "off_min_s": min(times["off"]),
            "guard_share": on / off - 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", default="finetune,ssl")
    parser.add_argument("--backbone", default="hrnet_w18_small")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = comparable across machines)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for kind in args.kinds.split(","):
        r = bench_kind(kind, args.backbone, args.size, args.micro_batch, args.repeats)
        results[kind] = {"threads": args.threads, **r}
        print(f"{kind}: guard on {r['on_median_s'] * 1000:.1f} ms, off {r['off_median_s'] * 1000:.1f} ms per step "
              f"(median of {args.repeats}): {r['guard_share']:+.1%}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
