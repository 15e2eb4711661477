"""Framework tax: the distseg training step against a plain PyTorch loop of the same model, optimizer, batch and crop.

For each kind (finetune, distill, ssl at 2 and at 5 TTA views) one process builds the stage exactly as a training
run does (``Trainer``: the kind's task, the DeepSpeed engine with the ds_config's resolved fast path, the loaders
over real JPEG shards) and calls the loop's own ``train_step``; beside it, a plain loop holds the same model
architecture and weights, AdamW with the same settings and LR schedule, and the same losses, on batches already
in memory. The two are timed alternately (distseg, plain, distseg, plain, ...) in ``--rounds`` rounds of ``--steps``
steps, after a warm-up of each, so the machine's drift falls on both. Step times are this process's CPU seconds per
step (one compute thread; wall seconds are recorded beside them). distseg/plain is the plain loop's step time over
distseg's (1.0 = no tax; target >= 0.97), with min/median/max over rounds; SSL/supervised is distseg's ssl step over
its finetune step.

The plain steps (what a user would write by hand):
- finetune: ``loss = supervised_loss(model(x), y)``; backward; AdamW step; LR step.
- distill: + a frozen teacher forward under ``no_grad``, ``alpha`` × KD(T) and EWC (all-ones Fisher at the
  teacher's weights).
- ssl: + the EMA teacher's TTA probabilities (one batched forward), pseudo-labels, a second student forward on the
  strong view (BN statistics frozen), the consistency loss, and the EMA update.

    python benchmarks/bench_overhead.py                          # the dubai_10pct model, 256 px, batch 8
    python benchmarks/bench_overhead.py --size 128 --batch 4     # quicker

Threads: one (``OMP_NUM_THREADS=1`` unless set). Duration at 256 px / batch 8 / 3 rounds of 3 steps on one idle
core: about 10 minutes. Results: benchmarks/results/overhead.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "overhead.json"
KINDS = {"finetune": ("finetune", ()), "distill": ("distill", ()),
         "ssl_2views": ("ssl", ("ssl.tta=[identity, hflip]",)), "ssl_5views": ("ssl", ())}


def plain_step(kind: str, trainer, batch: int, size: int, ratio: int):
    """A hand-written step of the same computation as ``trainer``'s, on in-memory tensors (a closure)."""
    import torch

    from distseg.losses import EWC, consistency_loss, kd_loss, supervised_loss
    from distseg.ops.ema import EMA
    from distseg.ops.pseudo import pseudo_label, tta_probs

    task, cfg = trainer.task, trainer.cfg
    model = copy.deepcopy(trainer.engine.module)
    for hook in list(model._forward_pre_hooks):  # the plain loop applies no layout of its own
        del model._forward_pre_hooks[hook]
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: 1.0)
    classes = task.class_map.num_classes
    gen = torch.Generator().manual_seed(0)
    x, x_u, x_s = (torch.rand(n, 3, size, size, generator=gen) for n in (batch, batch * ratio, batch * ratio))
    y = torch.randint(0, classes, (batch, size, size), generator=gen)
    opts = task.options
    teacher = copy.deepcopy(getattr(task, "teacher", model)).eval()
    ewc = None
    if kind == "distill" and opts.ewc_lambda > 0:
        anchor = {n: p.detach().clone() for n, p in teacher.named_parameters()}
        ewc = EWC(anchor, {n: torch.ones_like(p) for n, p in anchor.items()}, opts.ewc_lambda).bind(model)
    bn = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    bn_momentum = [m.momentum for m in bn]
    ema = EMA(teacher, model, alpha=0.99) if kind == "ssl" else None

    def step() -> None:
        logits = model(x).float()
        loss = supervised_loss(logits, y, cfg.loss)
        if kind == "distill":
            with torch.no_grad():
                teacher_logits = teacher(x).float()
            loss = loss + opts.alpha * kd_loss(logits, teacher_logits, T=opts.temperature)
            if ewc is not None:
                loss = loss + ewc.penalty()
        if kind == "ssl":
            probs = tta_probs(teacher, x_u, opts.tta, opts.brightness)
            pl = pseudo_label(probs, tau=opts.tau, from_logits=False, ignore_index=task.class_map.ignore_index)
            for m in bn:  # BN running statistics from the labelled forward only, as the stage does
                m.momentum = 0.0
            logits_u = model(x_s).float()
            for m, momentum in zip(bn, bn_momentum):
                m.momentum = momentum
            loss = loss + opts.lambda_u * consistency_loss(logits_u, pl.labels, pl.keep, kind=opts.consistency)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
        if ema is not None:
            ema.update(True)

    return step


def timed(step, n: int) -> tuple[float, float]:
    """(wall, CPU) seconds per step over ``n`` steps. The CPU time of this process is the figure compared: with one
    compute thread it is the step's work, which other jobs on a shared machine stretch in wall time but barely
    change. (Loader workers are other processes: their wait shows in ``data_wait``.)"""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        step()
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


def summary(values: list[float]) -> dict:
    return {"min": round(min(values), 4), "median": round(statistics.median(values), 4), "max": round(max(values), 4)}


def measure_kind(name: str, args, ws, env) -> dict:
    """Alternate the distseg step and the plain step of one kind; per-round seconds per step and the ratios."""
    import dataclasses
    import gc

    from distseg.bench import fixtures
    from distseg.bench.train import stage_step
    from distseg.stages.registry import get_kind
    from distseg.stages.trainer import Trainer

    kind, sets = KINDS[name]
    bench = dataclasses.replace(args.base, stage=kind, stage_set=sets)
    stage_cfg = fixtures.stage_config(bench, shards=ws.shards, parent=ws.parent, ds_config=ws.ds_config,
                                      run_dir=str(ws.folder / f"run-{name}"), micro_batch=args.batch, world_size=1)
    trainer = Trainer(get_kind(kind), stage_cfg, env)
    distseg_step, streams = stage_step(trainer, env)
    plain = plain_step(kind, trainer, args.batch, args.size, args.base.unlabeled_ratio)
    for _ in range(args.warmup):
        distseg_step()
        plain()
    rounds = {"distseg": [], "plain": [], "distseg_wall": [], "plain_wall": [], "data_wait": []}
    for _ in range(args.rounds):
        for s in streams:
            s.waited = 0.0
        wall, cpu = timed(distseg_step, args.steps)
        rounds["distseg"].append(cpu)
        rounds["distseg_wall"].append(wall)
        rounds["data_wait"].append(sum(s.waited for s in streams) / args.steps)
        wall, cpu = timed(plain, args.steps)
        rounds["plain"].append(cpu)
        rounds["plain_wall"].append(wall)
        print(name, {k: round(v[-1], 3) for k, v in rounds.items()}, flush=True)
    ratios = [p / d for p, d in zip(rounds["plain"], rounds["distseg"])]
    precision = trainer.ds_cfg.get("fast_path") or "as configured"
    del trainer, plain
    gc.collect()
    return {"kind": kind, "overrides": list(sets), "fast_path": precision,
            "step_s": {k: summary(v) for k, v in rounds.items()}, "rounds": rounds,
            "images_per_cpu_s_distseg": round(args.batch / statistics.median(rounds["distseg"]), 3),
            "images_per_cpu_s_plain": round(args.batch / statistics.median(rounds["plain"]), 3),
            "distseg_over_plain": summary(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="loader workers (the dubai recipes use 1)")
    parser.add_argument("--ds_config", default="ds_configs/cpu_auto.json")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {list(KINDS)}")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from distseg.bench.config import BenchConfig
    from distseg.bench.train import workspace
    from distseg.engine.distributed import init_distributed
    from distseg.models import ModelConfig

    model = ModelConfig(backbone="efficientnet_lite0", pretrained=None, psa="parallel", aspp_channels=256,
                        decoder_channels=128)
    args.base = BenchConfig(stage="ssl", device="cpu", size=args.size, micro_batches=(args.batch,),
                            warmup=1, steps=1, num_workers=args.workers, ds_config=args.ds_config, model=model)
    env = init_distributed(None, "cpu")
    load_before = os.getloadavg()
    results = {}
    with workspace(args.base, env) as ws:
        for name in args.kinds.split(","):
            results[name] = measure_kind(name, args, ws, env)
    sup = results.get("finetune", {}).get("step_s", {}).get("distseg", {}).get("median")
    ssl_ratio = {k: round(v["step_s"]["distseg"]["median"] / sup, 3)
                 for k, v in results.items() if k.startswith("ssl") and sup}
    out = {"config": {"size": args.size, "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
                      "workers": args.workers, "ds_config": args.ds_config, "model": "efficientnet_lite0 + PSA, "
                      "ASPP 256, decoder 128", "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                      "load_average_before": load_before, "load_average_after": os.getloadavg()},
           "kinds": results, "ssl_over_supervised": ssl_ratio}
    for name, r in results.items():
        print(f"{name:<11} distseg {r['step_s']['distseg']['median']:.3f} CPU s/step, plain "
              f"{r['step_s']['plain']['median']:.3f}: distseg/plain {r['distseg_over_plain']}")
    print("ssl/supervised (distseg):", ssl_ratio)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
