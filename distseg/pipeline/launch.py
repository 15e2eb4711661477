"""Deciding what each stage needs (skip, resume, start) and running it as a logged subprocess."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distseg.config import save_config
from distseg.engine import checkpoint as ckpt
from distseg.pipeline.plan import PlannedStage
from distseg.pipeline.recipe import EVAL
from distseg.stages.folder import same_run

LOG_NAME = "run.log"


@dataclass
class Decision:
    """What to do with one stage and why (shown in the summary)."""

    action: str
    """'skip', 'resume', 'start' (empty folder) or 'restart' (folder replaced with --force)."""
    reason: str

    @property
    def flags(self) -> list[str]:
        return {"resume": ["--resume"], "restart": ["--force"]}.get(self.action, [])


def _eval_is_current(stage: PlannedStage) -> bool:
    path = stage.folder / "eval.json"
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    opts = stage.eval_options
    return (saved.get("split") == opts.split and saved.get("shards") == stage.data_path
            and saved.get("model") == stage.parent_path and ("sliding_window" in saved) == opts.sliding)


def decide(stage: PlannedStage, parent_reran: bool) -> Decision:
    """Skip a finished stage with the same config; resume an interrupted one; otherwise (re)start it."""
    folder = stage.folder
    if stage.kind == EVAL:  # evaluation overwrites eval.json; it never needs --force
        if parent_reran:
            return Decision("start", f"parent {stage.spec.parent!r} (re)runs first")
        return Decision("skip", "evaluated") if _eval_is_current(stage) else Decision("start", "")
    if parent_reran:
        return Decision("restart" if folder.exists() else "start", f"parent {stage.spec.parent!r} (re)runs first")
    if not folder.exists() or not any(folder.iterdir()):
        return Decision("start", "")
    try:
        saved = ckpt.read_stage(folder)
    except ckpt.CheckpointError:
        return Decision("restart", "folder holds no stage record")
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


def child_env() -> dict[str, str]:
    """The stage processes' environment: DeepSpeed on CPU when no GPU is visible (unless the user chose)."""
    env = dict(os.environ)
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
                task) -> tuple[int, float, float]:
    """Run the stage's command with its output in ``log_path``; update ``progress`` from metrics.jsonl.

    Returns (exit status, wall seconds, CPU seconds of the stage's processes). CPU time is the steadier cost on a
    shared machine, where wall time also measures everybody else's load. The log is copied into the stage folder afterwards (it cannot live there
    while running: a restarted stage's folder is replaced by the stage itself).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start, cpu_start = time.perf_counter(), _children_cpu()
    with open(log_path, "w") as log:
        log.write(f"$ {stage.display} {' '.join(decision.flags)}\n")
        log.flush()
        proc = subprocess.Popen(stage.command + decision.flags, stdout=log, stderr=subprocess.STDOUT,
                                env=child_env(), start_new_session=True)
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                if stage.config is not None:
                    step, row = _last_step(stage.folder / "metrics.jsonl")
                    loss = f"loss {row['loss']:.3f}" if "loss" in row else ""
                    progress.update(task, completed=step, info=loss)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
    seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu_start
    if stage.folder.is_dir():
        (stage.folder / LOG_NAME).write_text(log_path.read_text())
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
