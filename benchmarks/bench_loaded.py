"""A loaded machine costs time, not CPU: a small distill stage beside one busy single-threaded job.

The demo's SKD distill stage (EfficientNet-Lite0 + PSA, 64-px crops, micro-batch 8, random weights: the cost of a
step does not depend on them) runs as ``python -m distseg.stages distill`` for ``--steps`` optimizer steps, twice per
round, while a ``while True: pass`` process keeps one core busy:

- **fixed**: ``OMP_NUM_THREADS=2`` and OpenMP's default waiting (what a stage ran with before threads were chosen);
- **chosen**: the environment ``distseg run`` gives a stage (``distseg.pipeline.launch.child_env``): threads from
  the cores free at launch, OpenMP waiting passively.

Rounds alternate the two (fixed, chosen, fixed, ...). Each run's wall time and CPU seconds (user + system, from
``wait4``) are recorded, with the idle CPUs measured just before it. A regression (the chosen run taking several
times the wall of an unloaded one, or burning far more CPU than the fixed one's useful work) shows as a ratio
fixed/chosen near or below 1 on a 2-core machine.

    python benchmarks/bench_loaded.py [--steps 20] [--rounds 2] [--timeout 400]

About 2-10 minutes on a 2-core machine (the fixed runs dominate); results go to benchmarks/results/loaded.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "loaded.json"
REPO = Path(__file__).resolve().parents[1]


def prepare(folder: Path, steps: int) -> Path:
    """Synthetic 64-px shards, a random-weight teacher folder and the distill StageConfig; the config's path."""
    from distseg.bench import fixtures
    from distseg.bench.config import BenchConfig
    from distseg.config import save_config
    from distseg.models import ModelConfig
    from distseg.stages.data import data_class_map

    model = ModelConfig(backbone="efficientnet_lite0", pretrained=None, psa="parallel", aspp_channels=64,
                        decoder_channels=64)
    cfg = BenchConfig(stage="distill", size=64, micro_batches=(8,), warmup=1, steps=steps - 1, model=model,
                      num_workers=0, synthetic_images=16, ds_config="ds_configs/cpu_auto.json")
    shards = fixtures.synthetic_shards(folder, 16, *fixtures.synthetic_sizes(16, 8, 1, 1), 64)
    parent = fixtures.parent_folder(folder / "teacher", model, data_class_map(str(shards)))
    stage = fixtures.stage_config(cfg, shards=str(shards), parent=str(parent), ds_config=cfg.ds_config,
                                  run_dir=str(folder / "run"), micro_batch=8, world_size=1)
    path = folder / "distill.yaml"
    save_config(stage, path)
    return path


def fixed_env() -> dict[str, str]:
    """Two compute threads, OpenMP's default wait policy: the behaviour before threads were chosen."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME")}
    return dict(env, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", DS_ACCELERATOR="cpu")


def chosen_env() -> dict[str, str]:
    """What ``distseg run`` launches a stage with when the user set no thread count."""
    from distseg.pipeline.launch import child_env

    saved = {k: os.environ.pop(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    try:
        return child_env(1)
    finally:
        os.environ.update(saved)


def run_stage(config: Path, out: Path, env: dict[str, str], timeout: float) -> dict:
    """One stage process; wall seconds, CPU seconds and whether it finished within ``timeout``."""
    from distseg.resources import idle_cpus

    idle = idle_cpus()
    cmd = [sys.executable, "-m", "distseg.stages", "distill", "--config", str(config), "--out", str(out), "--force"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, finished = start + timeout, True
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            finished = False
            break
        time.sleep(0.05)
    wall = time.perf_counter() - start
    if finished and os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"stage failed: {proc.stderr.read().decode()[-3000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "finished": finished,
            "threads": env["OMP_NUM_THREADS"], "wait_policy": env.get("OMP_WAIT_POLICY", "(default)"),
            "idle_cpus_before": None if idle is None else round(idle, 2)}


def summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=400.0, help="seconds before a run is stopped (recorded)")
    parser.add_argument("--no-busy", action="store_true", help="measure the idle machine (no busy job)")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"fixed": [], "chosen": []}
    with tempfile.TemporaryDirectory(prefix="bench-loaded-") as tmp:
        config = prepare(Path(tmp), args.steps)
        busy = None if args.no_busy else subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(1.0)
            for r in range(args.rounds):
                for name, env in (("fixed", fixed_env()), ("chosen", chosen_env())):
                    run = run_stage(config, Path(tmp) / f"run-{name}-{r}", env, args.timeout)
                    runs[name].append(run)
                    print(name, run, flush=True)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    ratios = [f["wall_s"] / c["wall_s"] for f, c in zip(runs["fixed"], runs["chosen"])]
    result = {"config": {"steps": args.steps, "busy_job": not args.no_busy, "cpu_count": os.cpu_count(),
                         "load_average_after": os.getloadavg()},
              "runs": runs,
              "wall_s": {k: summary([r["wall_s"] for r in v]) for k, v in runs.items()},
              "cpu_s": {k: summary([r["cpu_s"] for r in v]) for k, v in runs.items()},
              "wall_ratio_fixed_over_chosen": summary(ratios)}
    print(json.dumps({k: result[k] for k in ("wall_s", "cpu_s", "wall_ratio_fixed_over_chosen")}, indent=1))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    name = RESULTS if not args.no_busy else RESULTS.with_name("loaded_idle.json")
    name.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {name}")


if __name__ == "__main__":
    main()
