"""Deciding what each stage needs (skip, resume, start) and running it as a logged subprocess."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distseg.config import save_config
from distseg.folders import user_entries
from distseg.engine import checkpoint as ckpt
from distseg.pipeline.plan import PlannedStage
from distseg.pipeline.recipe import EVAL
from distseg.stages.folder import same_run
from distseg.supervise import Interrupted, deferred_stop, parent_death_signal, stop_group, supervised_env

LOG_NAME = "run.log"


@dataclass
class Decision:
    """What to do with one stage and why (shown in the summary)."""

    action: str
    """'skip', 'resume', 'start' (empty folder), 'restart' (stage folder replaced with --force) or 'refuse' (the
    folder holds something distseg did not write: the run stops before it)."""
    reason: str

    @property
    def flags(self) -> list[str]:
        return {"resume": ["--resume"], "restart": ["--force"]}.get(self.action, [])


def _eval_is_current(stage: PlannedStage) -> bool:
    """Whether eval.json measured the parent as the stage asks now (split, data, model, sliding windows and the
    folders of its BatchNorm re-estimation). A stage folder's headline must be its last model
    (``checkpoint: last``): an eval.json from before that rule measured the folder root (best-validation) and reruns."""
    path = stage.folder / "eval.json"
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    opts = stage.eval_options
    return (saved.get("split") == opts.split and saved.get("shards") == stage.data_path
            and saved.get("model") == stage.parent_path and ("sliding_window" in saved) == opts.sliding
            and saved.get("adapt_bn", {}).get("folders", []) == stage.adapt_bn
            and saved.get("checkpoint", "root") == ("last" if Path(stage.parent_path).is_dir() else None))


def decide(stage: PlannedStage, parent_reran: bool) -> Decision:
    """Skip a finished stage with the same config; resume an interrupted one; otherwise (re)start it. A folder
    that is not a stage folder is refused: ``--force`` would delete what distseg did not write."""
    folder = stage.folder
    if stage.kind == EVAL:  # evaluation overwrites eval.json; it never needs --force
        if parent_reran:
            return Decision("start", f"parent {stage.spec.parent!r} (re)runs first")
        return Decision("skip", "evaluated") if _eval_is_current(stage) else Decision("start", "")
    if user_entries(folder) and not (folder / ckpt.STAGE_JSON).is_file():
        return Decision("refuse", f"{folder} is not a stage folder (no {ckpt.STAGE_JSON}); move it away")
    if parent_reran:
        return Decision("restart" if user_entries(folder) else "start", f"parent {stage.spec.parent!r} (re)runs first")
    if not user_entries(folder):
        return Decision("start", "")
    try:
        saved = ckpt.read_stage(folder)
    except ckpt.CheckpointError:
        return Decision("restart", "unreadable stage record")
    if not same_run(saved, stage.identity):
        return Decision("restart", "config changed")
    if ckpt.is_finished(folder):
        return Decision("skip", "finished with the same config")
    return Decision("resume", "interrupted")


def write_stage_config(stage: PlannedStage) -> None:
    """The resolved StageConfig YAML the launcher reads (also a record of exactly what ran)."""
    if stage.config_file is not None:
        stage.config_file.parent.mkdir(parents=True, exist_ok=True)
        save_config(stage.config, stage.config_file)


def child_env(procs: int = 1) -> dict[str, str]:
    """The environment of a stage launched as ``procs`` processes per node: DeepSpeed on CPU when no GPU is visible
    (unless the user chose), compute threads from the cores free right now (:func:`distseg.resources.thread_env`),
    and this process as their supervisor (their ranks exit when it is gone: :mod:`distseg.supervise`)."""
    from distseg.resources import thread_env

    env = thread_env(supervised_env(dict(os.environ)), procs)
    if "DS_ACCELERATOR" not in env:
        import torch

        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _last_step(metrics: Path) -> tuple[int, dict[str, Any]]:
    """The newest training step and its logged losses, read from the stage's metrics.jsonl."""
    if not metrics.is_file():
        return 0, {}
    step, last = 0, {}
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written right now
        if "loss" in row:
            step, last = int(row.get("step", step)), row
    return step, last


def run_process(stage: PlannedStage, decision: Decision, log_path: Path, progress,
                task, procs: int = 1) -> tuple[int, float, float]:
    """Run the stage's command with its output appended to ``log_path``; update ``progress`` from metrics.jsonl.

    Returns (exit status, wall seconds, CPU seconds of the stage's processes). CPU time is the steadier cost on a
    shared machine, where wall time also measures everybody else's load. The stage runs in a process group of its
    own that is stopped whenever this process stops (Ctrl-C, SIGTERM), and it dies with this process even on
    ``kill -9`` (:mod:`distseg.supervise`). Each invocation appends to the log under a header line; the log is
    copied into the stage folder afterwards (it cannot live there while running: a restarted stage's folder is
    replaced by the stage itself). ``procs`` is the stage's processes per node, which share the free cores.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start, cpu_start = time.perf_counter(), _children_cpu()
    env = child_env(procs)
    with open(log_path, "ab") as log:
        header = f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {stage.display} " \
                 f"{' '.join(decision.flags)} (threads per process: {env.get('OMP_NUM_THREADS')})\n"
        log.write(header.encode())
        log.flush()
        proc = subprocess.Popen(stage.command + decision.flags, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, preexec_fn=parent_death_signal())
        try:
            with deferred_stop() as stop:
                while proc.poll() is None and not stop:
                    time.sleep(0.5)
                    if stage.config is not None:
                        step, row = _last_step(stage.folder / "metrics.jsonl")
                        loss = f"loss {row['loss']:.3f}" if "loss" in row else ""
                        progress.update(task, completed=step, info=loss)
            if stop:
                raise KeyboardInterrupt if stop[0] == signal.SIGINT else Interrupted(stop[0])
        except BaseException:  # Ctrl-C, SIGTERM (Interrupted) or any failure here: the stage must not run on
            stop_group(proc)
            raise
    seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu_start
    if stage.folder.is_dir():
        shutil.copyfile(log_path, stage.folder / LOG_NAME)
    return proc.returncode, seconds, cpu


def _children_cpu() -> float:
    """User + system CPU seconds of all finished child processes (and the children they waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def log_tail(log_path: Path, lines: int = 30) -> str:
    """The last lines of a stage's log (shown when it fails)."""
    if not log_path.is_file():
        return "(no log)"
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
