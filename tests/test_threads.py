"""Compute threads per stage process: chosen from the cores free now, shared between a stage's processes, never
above the usable ones, the user's own setting left alone, and OpenMP told not to spin."""
from __future__ import annotations

import subprocess
import sys

import pytest

from distseg.resources import QUIET_OPENMP, choose_threads, idle_cpus, thread_env


@pytest.mark.parametrize("usable, idle, procs, expected", [
    (2, 2.0, 1, 2),      # idle machine: every core
    (2, 1.0, 1, 1),      # one busy single-threaded job beside the stage: the other core
    (2, 1.1, 1, 1),
    (2, 1.6, 1, 2),      # a near-idle machine keeps its last core
    (2, 0.0, 1, 1),      # fully loaded: one thread, never zero
    (16, 15.7, 4, 4),    # four ranks share the free cores
    (16, 5.0, 4, 1),
    (4, 31.0, 1, 4),     # idle CPUs outside this process's affinity mask do not count
    (8, None, 2, 4),     # idleness unknown (no /proc/stat): all usable cores
])
def test_choose_threads_table(usable, idle, procs, expected):
    assert choose_threads(usable, idle, procs) == expected


def test_idle_cpus_is_a_fraction_of_the_machine():
    idle = idle_cpus(0.05)
    if idle is not None:  # Linux
        import os

        assert 0.0 <= idle <= os.cpu_count()


def test_thread_env_sets_counts_and_passive_waiting_unless_the_user_chose():
    env = thread_env({"PATH": "/bin"}, procs=1)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] and int(env["OMP_NUM_THREADS"]) >= 1
    assert all(env[k] == v for k, v in QUIET_OPENMP.items())
    mine = thread_env({"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}, procs=2)
    assert mine["OMP_NUM_THREADS"] == "3" and "MKL_NUM_THREADS" not in mine, "the user's count is kept"
    assert mine["OMP_WAIT_POLICY"] == "ACTIVE" and mine["KMP_BLOCKTIME"] == "0"


def test_configure_threads_sets_torch_in_this_process():
    code = ("import os; os.environ.pop('OMP_NUM_THREADS', None); os.environ.pop('MKL_NUM_THREADS', None)\n"
            "import torch; from distseg.resources import configure_threads\n"
            "n = configure_threads(); assert torch.get_num_threads() == n >= 1, (torch.get_num_threads(), n)\n"
            "print(n, os.environ['OMP_WAIT_POLICY'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[1] == "PASSIVE"
