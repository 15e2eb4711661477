"""Process-group lifetime: a group that init_distributed opened is destroyed before the interpreter exits."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO, stage_env

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
