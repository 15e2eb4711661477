"""Clocks of a benchmark: step boundaries, time blocked on the loader, peak memory, and FLOPs of one step.

Nothing here adds a host synchronisation inside a step: on CUDA, step boundaries are CUDA events recorded on the
current stream and read after the timed region; the loader wait is host wall time around ``next()``, which is
where a real run blocks when the loader is too slow.
"""
from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from typing import Any, Callable, Iterator

import torch


class TimedStream:
    """Proxy of an ``EpochStream`` that adds the host time spent in ``next()`` to ``waited`` (seconds)."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.waited = 0.0

    def __iter__(self) -> "TimedStream":
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.stream)
        finally:
            self.waited += time.perf_counter() - start

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class StepClock:
    """Marks step boundaries: CUDA events on a GPU (read once at the end), ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list[Any] = []
        self.wall: tuple[float, float] | None = None
        self._start = 0.0

    def start(self) -> None:
        """Drain queued work, then open the timed region (the one synchronisation before it)."""
        self.synchronize()
        self._start = time.perf_counter()
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def stop(self) -> None:
        """Close the timed region: wait for the device so the wall time covers all the queued work."""
        self.synchronize()
        self.wall = (self._start, time.perf_counter())

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def step_seconds(self) -> list[float]:
        """Duration of every step between consecutive marks."""
        if self.cuda:
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]

    @property
    def wall_seconds(self) -> float:
        if self.wall is None:
            raise RuntimeError("StepClock.stop() was not called")
        return self.wall[1] - self.wall[0]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] (numpy's default method), without numpy."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated by tensors on this GPU, or the process's peak RSS on CPU (GiB).

    The CPU figure is the process high-water mark since it started (the OS keeps no resettable peak).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


@contextlib.contextmanager
def grad_checkpointing_off(model: torch.nn.Module) -> Iterator[None]:
    """Disable timm activation checkpointing for the duration: recomputation is not model work, so MFU must not
    count it (what is left is the model FLOPs of the step)."""
    body = getattr(getattr(model, "backbone", None), "body", None)
    enabled = bool(getattr(model, "config", None) and model.config.grad_checkpointing and body is not None)
    if enabled:
        body.set_grad_checkpointing(False)
    try:
        yield
    finally:
        if enabled:
            body.set_grad_checkpointing(True)


def count_step_flops(run_step: Callable[[], None]) -> int:
    """FLOPs of one call of ``run_step`` (forward and backward) by ``torch.utils.flop_counter``.

    Convolutions and matrix products count 2 FLOPs per multiply-add, in the forward and in the backward pass;
    element-wise work is not counted (the usual convention behind MFU).
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run_step()
    return int(counter.get_total_flops())
