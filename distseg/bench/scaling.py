"""``bench scaling``: the same ``bench train`` run at 1, 2, … N processes, and its efficiency table.

Each process keeps the same micro-batch (weak scaling, as data-parallel training is used): ideal scaling keeps
images/s per process constant, so efficiency(n) = per-process images/s at n / per-process images/s at 1.
"""
from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from distseg.bench.config import BenchConfig
from distseg.bench.records import RECORDS_FILE, append_record, base_record, read_records


class ScalingError(RuntimeError):
    """A process count of the scaling sweep failed or wrote no record."""


def default_procs(n: int) -> list[int]:
    """1, 2, 4, … up to ``n``, plus ``n`` itself."""
    counts, k = [], 1
    while k < n:
        counts.append(k)
        k *= 2
    return counts + [n]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_train(cfg: BenchConfig, procs: int) -> int:
    """Run ``bench train`` as ``deepspeed --num_gpus procs --module distseg.bench train --config FILE``; its exit code.

    The resolved config travels as a file so every rank parses exactly the same settings. Output streams through.
    """
    from distseg.config import save_config

    env = dict(os.environ)
    if cfg.device == "cpu" or not _cuda_available():
        env["DS_ACCELERATOR"] = "cpu"
    with tempfile.TemporaryDirectory(prefix="distseg-bench-cfg-") as tmp:
        path = Path(tmp) / "bench.json"
        save_config(cfg, path)
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(procs),
               "--master_port", str(_free_port()), "--module", "distseg.bench", "train", "--config", str(path)]
        return subprocess.run(cmd, env=env).returncode


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def efficiency_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per process count (ascending): images/s, per process, speed-up and efficiency against the smallest
    count (normally 1)."""
    ordered = sorted(records, key=lambda r: r["world_size"])
    base = ordered[0]
    rows = []
    for r in ordered:
        per = r["images_per_s_per_gpu"]
        rows.append({"processes": r["world_size"], "images_per_s": r["images_per_s"], "images_per_s_per_gpu": per,
                     "speedup": r["images_per_s"] / base["images_per_s"],
                     "efficiency": per / base["images_per_s_per_gpu"],
                     "step_time_median_s": r["step_time_s"]["median"], "data_wait_fraction": r["data_wait_fraction"],
                     "mfu": r["mfu"]})
    return rows


def run_scaling(cfg: BenchConfig, procs: list[int]) -> dict[str, Any]:
    """Launch one ``bench train`` per process count, then append and return a ``scaling`` record with the table."""
    import torch

    if len(cfg.micro_batches) != 1:
        raise ScalingError(f"scaling uses one micro-batch per process, got {list(cfg.micro_batches)}")
    tag = cfg.tag or f"scaling-{secrets.token_hex(4)}"
    run_cfg = dataclasses.replace(cfg, tag=tag)
    for n in sorted(set(procs)):
        code = launch_train(run_cfg, n)
        if code != 0:
            raise ScalingError(f"bench train with {n} process(es) failed (exit code {code}); see its output above")
    path = Path(cfg.out_dir) / RECORDS_FILE
    runs = [r for r in read_records([path]) if r.get("tag") == tag and r["kind"] == "train" and r["status"] == "ok"]
    if sorted(r["world_size"] for r in runs) != sorted(set(procs)):
        raise ScalingError(f"{path}: expected one record per process count {sorted(set(procs))} for tag {tag}, "
                           f"found {sorted(r['world_size'] for r in runs)}")
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    record = base_record("scaling", runs[0]["config"], device)
    record.update(tag=tag, stage=cfg.stage, micro_batch=cfg.micro_batches[0], size=cfg.size,
                  backbone=cfg.model.backbone, precision=runs[0]["precision"], rows=efficiency_rows(runs))
    append_record(cfg.out_dir, record)
    return record
