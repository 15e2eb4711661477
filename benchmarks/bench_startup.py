"""Stage start-up: how long a stage process takes from its start to its first step, and an evaluation to its first
batch, against the imports alone.

A recipe launches one process per stage (10-30 of them), so each pays this price. The benchmark runs, ``--rounds``
times on the same warm machine, a one-step stage process of each kind in ``--kinds`` (the ``dubai_10pct`` model, real
JPEG shards written by the benchmark) and an ``eval`` process on the finished stage, and reads what they record
themselves: ``startup_s`` in the stage's metrics.jsonl and in eval.json (seconds since the process started, from the
kernel's process start time). Beside them, a fresh interpreter times its imports of torch, DeepSpeed and timm
(what every stage process imports before distseg can do anything). distseg's own set-up is the difference.

    python benchmarks/bench_startup.py                 # about 2 minutes on a 2-core machine
    python benchmarks/bench_startup.py --kinds finetune,ssl,distill --rounds 5

Results: benchmarks/results/startup.json (per round and median/min/max).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "startup.json"
IMPORTS = ("torch", "deepspeed", "timm")
IMPORT_TIMER = ("import time, json; t0 = time.perf_counter(); out = {}\n"
                "for name in %r:\n"
                "    __import__(name); out[name] = time.perf_counter() - t0\n"
                "print(json.dumps(out))")


def summary(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 2), "median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def import_times(env: dict[str, str]) -> dict[str, float]:
    """Cumulative seconds after each import of torch, DeepSpeed and timm in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", IMPORT_TIMER % (IMPORTS,)], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Run a stage process to its end (its output into ``log``); its wall seconds. A failure ends the benchmark
    with the log's tail (the workspace holding the log is removed on the way out)."""
    start = time.perf_counter()
    with log.open("w") as fh:
        code = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"{tail}\n{' '.join(cmd)} failed (exit {code})")
    return time.perf_counter() - start


def startup_of(folder: Path) -> float:
    """The ``startup_s`` a training stage logged in its metrics.jsonl."""
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "startup_s" in record:
            return float(record["startup_s"])
    raise SystemExit(f"{folder}/metrics.jsonl: no startup_s (no /proc on this machine?)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", default="finetune,ssl")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from distseg.bench import fixtures
    from distseg.bench.config import BenchConfig
    from distseg.bench.train import workspace
    from distseg.config import to_dict
    from distseg.engine.distributed import init_distributed
    from distseg.models import ModelConfig
    import yaml

    model = ModelConfig(backbone="efficientnet_lite0", pretrained=None, psa="parallel", aspp_channels=256,
                        decoder_channels=128)
    kinds = args.kinds.split(",")
    base = BenchConfig(stage="ssl", device="cpu", size=args.size, micro_batches=(args.batch,), warmup=1, steps=1,
                       num_workers=1, ds_config="ds_configs/cpu_auto.json", model=model)
    env = init_distributed(None, "cpu")
    rendezvous = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    child_env = {k: v for k, v in os.environ.items() if k not in rendezvous}  # this process's group holds the port
    child_env["PYTHONUNBUFFERED"] = "1"
    rounds: dict[str, list[float]] = {name: [] for name in [*kinds, "eval", *IMPORTS]}
    walls: dict[str, list[float]] = {name: [] for name in [*kinds, "eval"]}
    load_before = os.getloadavg()
    with workspace(base, env) as ws:
        for r in range(args.rounds):
            for name, seconds in import_times(child_env).items():
                rounds[name].append(seconds)
            for kind in kinds:
                folder = ws.folder / f"{kind}-{r}"
                stage = fixtures.stage_config(dataclasses.replace(base, stage=kind), shards=ws.shards,
                                              parent=ws.parent, ds_config=ws.ds_config, run_dir=str(folder),
                                              micro_batch=args.batch, world_size=1)
                config = ws.folder / f"{kind}-{r}.yaml"
                config.write_text(yaml.safe_dump(to_dict(stage)))
                walls[kind].append(run([sys.executable, "-m", "distseg.stages", kind, "--config", str(config),
                                        "--out", str(folder)], child_env, ws.folder / f"{kind}-{r}.log"))
                rounds[kind].append(startup_of(folder))
            evaluated = ws.folder / f"{kinds[0]}-{r}"
            walls["eval"].append(run([sys.executable, "-m", "distseg.stages", "eval", str(evaluated), "--data",
                                      ws.shards, "--split", "val", "--no-sliding", "--out", str(ws.folder / f"eval-{r}")],
                                     child_env, ws.folder / f"eval-{r}.log"))
            rounds["eval"].append(json.loads((ws.folder / f"eval-{r}" / "eval.json").read_text())["startup_s"])
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in rounds.items()), flush=True)
    imports = statistics.median(rounds[IMPORTS[-1]])
    out = {"config": {"size": args.size, "batch": args.batch, "rounds": args.rounds, "model": "efficientnet_lite0 + "
                      "PSA, ASPP 256, decoder 128", "threads": child_env.get("OMP_NUM_THREADS", "stage default"),
                      "cpu_count": os.cpu_count(), "load_average_before": load_before,
                      "load_average_after": os.getloadavg()},
           "imports_cumulative_s": {name: summary(rounds[name]) for name in IMPORTS},
           "startup_s": {name: summary(rounds[name]) for name in [*kinds, "eval"]},
           "process_wall_s": {name: summary(v) for name, v in walls.items()},
           "distseg_setup_s": {name: round(statistics.median(rounds[name]) - imports, 2) for name in [*kinds, "eval"]},
           "imports_share_of_startup": {name: round(imports / statistics.median(rounds[name]), 3)
                                        for name in [*kinds, "eval"]},
           "rounds": rounds}
    for name in [*kinds, "eval"]:
        print(f"{name:<9} start-up {out['startup_s'][name]['median']:.2f} s (imports {imports:.2f} s, distseg's "
              f"set-up {out['distseg_setup_s'][name]:.2f} s)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
