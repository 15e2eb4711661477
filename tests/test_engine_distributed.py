"""Process-group lifetime: a group that init_distributed opened is destroyed before the interpreter exits, and a
clean end joins its worker threads."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO, stage_env, tiny_stage_config

_SCRIPT = r"""
import atexit
import torch.distributed as dist
from distseg.engine.distributed import init_distributed

# atexit runs its handlers last-registered first: this one runs after anything init_distributed registers
atexit.register(lambda: print("group alive at exit:", dist.is_initialized(), flush=True))
env = init_distributed(device="cpu")
print("world", env.world_size, dist.is_initialized(), flush=True)
"""


def test_the_group_is_destroyed_before_the_interpreter_exits():
    """A gloo group left to interpreter shutdown now and then aborted a 2-rank job that had finished its work."""
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=stage_env(),
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "world 1 True" in proc.stdout and "group alive at exit: False" in proc.stdout, proc.stdout


_STAGE = r"""
import os, sys
from distseg.stages.launcher import main

main("finetune", sys.argv[1:])  # returns on success: a failure exits non-zero
workers = sum(open(f"/proc/self/task/{t}/comm").read().startswith("pt_gloo") for t in os.listdir("/proc/self/task"))
print("gloo workers after the stage:", workers, flush=True)
"""


def test_a_finished_stage_leaves_no_process_group_thread(tmp_path, target_shards, init_weights):
    """The stage's entry point releases its ZeRO engine and ends the group: no gloo worker may still be releasing a
    collective's tensors when the interpreter shuts down (that aborted finished 2-rank jobs, 1 run in 7)."""
    cfg = tiny_stage_config(tmp_path, steps=2, fisher_batches=0)
    proc = subprocess.run([sys.executable, "-c", _STAGE, "--config", str(cfg), "--data", str(target_shards),
                           "--parent", str(init_weights), "--out", str(tmp_path / "run"),
                           "--ds_config", str(REPO / "ds_configs" / "zero2_fp32.json")],
                          capture_output=True, text=True, env=stage_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gloo workers after the stage: 0" in proc.stdout, proc.stdout[-2000:]
