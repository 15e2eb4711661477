"""What a process may use: the files that ship inside the package, and the CPU cores a stage may compute on.

Shipped files (the DeepSpeed configs and the recipes, with their class maps) live in ``distseg/ds_configs`` and
``distseg/recipes`` (the repository's top-level ``ds_configs/`` and ``recipes/`` point there), and are read through
:mod:`importlib.resources`, so they work from any working directory and after a non-editable ``pip install``.

Compute threads are chosen from the cores that are actually free (:func:`stage_threads`), with OpenMP told not to
spin (:func:`thread_env`): a compute thread that spins at a barrier while its sibling is descheduled by another job
burns the sibling's core, and a loaded 2-core machine then ran a stage 24× slower instead of 2× (docs/bench.md).
"""
from __future__ import annotations

import importlib.resources
import os
import sys
import time
from pathlib import Path
from typing import Mapping

FOLDERS = ("ds_configs", "recipes")


def folder(name: str) -> Path:
    """The shipped folder ``name`` as a filesystem path (the package is installed as files, not a zip)."""
    if name not in FOLDERS:
        raise KeyError(f"no shipped folder {name!r}; shipped: {FOLDERS}")
    return Path(str(importlib.resources.files("distseg") / name))


def shipped(name: str, path: str | Path) -> Path | None:
    """The shipped file for ``path``: as given below the folder (``ds_configs/x.json``) or by its bare file name;
    None when the package ships no such file."""
    base = folder(name)
    path = Path(path)
    parts = path.parts[1:] if path.parts and path.parts[0] == name else path.parts
    for candidate in (base.joinpath(*parts) if parts else None, base / path.name):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def shipped_recipes() -> list[str]:
    """Names of the shipped recipes (the YAML files of ``recipes/`` with a ``stages:`` list; class maps are not)."""
    return sorted(p.stem for p in folder("recipes").glob("*.yaml")
                  if any(line.startswith("stages:") for line in p.read_text().splitlines()))


# ------------------------------------------------------------------------------ compute threads

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Thread counts the user may set; either one set means the user chose and nothing is decided here."""
QUIET_OPENMP = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
"""OpenMP threads sleep at once at a barrier instead of spinning (GNU and Intel runtimes), unless the user says."""


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat, None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields[:8])  # idle + iowait; user..steal (guest time is inside user)


def idle_cpus(sample_s: float = 0.25) -> float | None:
    """How many CPUs were idle, on average, over the next ``sample_s`` seconds (None without /proc/stat)."""
    before = _cpu_times()
    if before is None:
        return None
    time.sleep(sample_s)
    after = _cpu_times()
    if after is None or after[1] <= before[1]:
        return None
    return (os.cpu_count() or 1) * (after[0] - before[0]) / (after[1] - before[1])


def choose_threads(usable: int, idle: float | None, procs: int = 1) -> int:
    """Compute threads per process for ``procs`` processes: the idle CPUs (rounded to the nearest whole CPU, and
    no more than the usable ones) shared between them, at least 1. Unknown idleness counts every usable CPU free.

    Rounding to nearest rather than down keeps a near-idle machine's last core (idle 1.8 of 2 → 2 threads) while a
    core held by a busy job (idle 1.0-1.2 of 2) is left to it.
    """
    free = usable if idle is None else min(usable, int(idle + 0.5))
    return max(1, free // max(1, procs))


def stage_threads(procs: int = 1, env: Mapping[str, str] | None = None) -> int | None:
    """Threads per stage process on this machine now, or None when the user set a thread count (they chose)."""
    env = os.environ if env is None else env
    if any(env.get(name) for name in THREAD_VARS):
        return None
    return choose_threads(usable_cpus(), idle_cpus(), procs)


def thread_env(env: dict[str, str], procs: int = 1) -> dict[str, str]:
    """``env`` for a stage launch of ``procs`` processes per node: thread counts from :func:`stage_threads` (unless
    the user set one) and OpenMP's passive waiting (unless the user set a policy). Returns ``env``, updated."""
    threads = stage_threads(procs, env)
    if threads is not None:
        for name in THREAD_VARS:
            env[name] = str(threads)
    for name, value in QUIET_OPENMP.items():
        env.setdefault(name, value)
    return env


def configure_threads(procs: int = 1) -> int:
    """Apply :func:`thread_env` to this process (a stage started directly, ``python -m distseg.stages``): call it
    before torch is imported so OpenMP reads the wait policy; torch's thread count is also set if it already is.
    Returns the thread count in force."""
    thread_env(os.environ, procs)
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return threads
