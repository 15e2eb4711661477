"""Rank-0 bookkeeping of a stage: ``metrics.jsonl``, DeepSpeed's monitor (TensorBoard, CSV, W&B), the progress bar."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, TextIO

from distseg.engine.checkpoint import write_text_atomic
from distseg.engine.distributed import DistEnv


def process_age() -> float:
    """Seconds since this process started (interpreter start-up and imports included), from the kernel's record of
    its start time. A recipe launches one process per stage, so this is the price each one pays before its first
    step (torch, DeepSpeed and timm imports, then distseg's own set-up). Without /proc, psutil's start time (whole
    seconds of boot time on some systems, so less exact)."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        import psutil

        return round(max(0.0, time.time() - psutil.Process().create_time()), 2)
    return round(uptime - started / os.sysconf("SC_CLK_TCK"), 2)


def scalar_events(prefix: str, values: dict[str, Any], step: int,
                  names: list[str] | None = None) -> Iterator[tuple[str, float, int]]:
    """(tag, value, step) for every finite number in a nested dict; lists of numbers are named by ``names``
    (the class names of a per-class IoU) or by position, and the confusion matrix is left out."""
    names = values.get("class_names", names)
    for key, value in values.items():
        tag = f"{prefix}/{key}"
        if isinstance(value, bool) or key in ("confusion", "class_names"):
            continue
        if isinstance(value, (int, float)):
            if math.isfinite(value):
                yield tag, float(value), step
        elif isinstance(value, dict):
            yield from scalar_events(tag, value, step, names)
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) or v is None for v in value):
            labels = names if names is not None and len(names) == len(value) else [str(i) for i in range(len(value))]
            for label, v in zip(labels, value):
                if v is not None and math.isfinite(v):
                    yield f"{tag}/{label}", float(v), step


def keep_through(path: Path, step: int) -> None:
    """Drop the metrics.jsonl lines of steps after ``step``, where a resumed run starts again.

    A run killed after its step-500 checkpoint may have logged steps 510-580 before it died; the resumed run takes
    those steps again and logs them anew. Without this the file would hold two records of each, one from weights the
    checkpoint never kept. A half-written last line (a kill mid-write) goes too, and a whole one that lost its newline
    gets it back, so the next record starts a line of its own.
    """
    if not path.is_file():
        return
    text = path.read_text()
    kept = "".join(f"{line}\n" for line in text.splitlines() if _logged_step(line) <= step)
    if kept != text:
        write_text_atomic(path, kept)


def _logged_step(line: str) -> float:
    """The step a metrics.jsonl line records (0 without one); infinity for a torn line, so that it is dropped."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf


PLAIN_EVERY_S = 30.0
"""Seconds between plain progress lines when stdout is not a terminal (a cluster job's log, nohup, a pipe)."""


def progress_line(name: str, step: int, total: int, info: str, elapsed_s: float, steps_done: int) -> str:
    """One plain progress line: stage, step/total, the logged terms, and the ETA at the rate seen so far."""
    eta = ""
    if steps_done > 0 and step < total:
        left = (total - step) * elapsed_s / steps_done
        eta = f" ETA {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"
    return f"{name}: step {step}/{total} {info}{eta}".rstrip()


class RunLog:
    """Writes what the loop logs: metrics.jsonl lines, monitor scalars and progress (rank 0 only).

    Progress is a rich bar on a terminal. Anywhere else (a batch job's output file, ``nohup``, a pipe) a bar is only
    drawn at the end, so a plain line (:func:`progress_line`) is printed instead, at most every ``every_s`` seconds
    and at the last step, whenever the loop logs its losses.
    """

    def __init__(self, folder: Path, env: DistEnv, total: int, start: int, monitor=None, *,
                 every_s: float = PLAIN_EVERY_S, stream: TextIO | None = None) -> None:
        self.env, self.name, self.total = env, folder.name, total
        self.path = folder / "metrics.jsonl"
        if env.is_main:
            keep_through(self.path, start)
        self.monitor = monitor if monitor is not None and getattr(monitor, "enabled", False) else None
        self.stream = stream if stream is not None else sys.stdout
        self.plain = env.is_main and not self.stream.isatty()
        self.every_s, self._start, self._t0, self._printed = every_s, start, time.monotonic(), float("-inf")
        self.progress = None
        if env.is_main and not self.plain:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self.progress.start()
            self.task = self.progress.add_task(folder.name, total=total, completed=start, info="")

    def write(self, record: dict[str, Any], prefix: str | None = None) -> None:
        """Append one metrics.jsonl line; with ``prefix``, also send its numbers to the monitor under it."""
        if not self.env.is_main:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.monitor is not None and prefix is not None:
            step = int(record["step"])
            body = record.get(prefix, {k: v for k, v in record.items() if k != "step"})
            self.monitor.write_events(list(scalar_events(prefix, body, step)))

    def advance(self, step: int, info: str | None = None) -> None:
        """The loop reached ``step``; ``info`` (the logged terms) comes with every losses line."""
        if self.progress is not None:
            self.progress.update(self.task, completed=step, **({"info": info} if info is not None else {}))
        elif self.plain and info is not None:
            now = time.monotonic()
            if now - self._printed >= self.every_s or step == self.total:
                self._printed = now
                line = progress_line(self.name, step, self.total, info, now - self._t0, step - self._start)
                print(line, file=self.stream, flush=True)

    def starting(self, step: int) -> None:
        """This process is about to take its first step (``step`` + 1): record in metrics.jsonl (``startup_s``)
        and print how long after the process started that is: its start-up."""
        if not self.env.is_main:
            return
        age = process_age()
        self.write({"step": step, "startup_s": age})
        print(f"{self.name}: step {step + 1} starts {age:.1f} s after the process started", file=self.stream,
              flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
