"""The one training loop every stage shares.

A stage's task returns a loss dict from ``step(batches)``; the loop owns everything else: drawing the batches of the
streams the stage declared, micro-steps and gradient accumulation through the DeepSpeed engine, logging without
host syncs in the step, evaluation and best-model tracking, checkpoints that are safe to resume from after a
``kill -9``, and finishing the stage folder.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from distseg.data.batch import Batches
from distseg.engine import checkpoint as ckpt
from distseg.engine.distributed import DistEnv, barrier, broadcast_object, rank_divergence


class StageTask(Protocol):
    """What the loop calls on a stage's task (``distseg.stages.task.Task`` implements it)."""

    def step(self, batches: Batches) -> dict[str, torch.Tensor]:
        """Losses of one micro-step on the given batches (``'loss'`` is the one optimised)."""

    def after_step(self, applied: bool) -> None:
        """Called once per optimizer step, with whether the optimizer really stepped (fp16 overflow skips)."""

    def sync(self) -> None:
        """Collective: make BN buffers (of every model the stage saves) identical across ranks."""

    def evaluate(self, loader) -> dict[str, Any] | None:
        """Validate; metrics with a ``'score'`` key (higher is better) keep the best model; None: no validation."""

    def export(self, folder: Path) -> None:
        """Write the weights a later stage or ``predict`` uses (rank 0 only; no collectives here)."""

    def save_extra(self, folder: Path) -> None:
        """Save state DeepSpeed does not own (an EMA teacher) into a checkpoint tag folder (rank 0)."""

    def load_extra(self, folder: Path) -> None:
        """Restore what :meth:`save_extra` wrote (every rank)."""

    def replicas(self) -> dict[str, torch.nn.Module]:
        """The modules every rank holds a copy of, by name (checked for divergence at the end)."""

    def finish(self, folder: Path) -> None:
        """Work done once at the very end, after the best weights are in place."""


class EpochStream:
    """An endless iterator over a loader that knows its (epoch, batch index) position.

    Resuming re-creates the epoch's deterministic order (``set_epoch``) and skips the batches already consumed, so
    a resumed run sees exactly the batches an uninterrupted one would have.
    """

    def __init__(self, loader) -> None:
        self.loader = loader
        self.epoch = 0
        self.index = 0
        self._it: Iterator | None = None

    def __iter__(self) -> "EpochStream":
        return self

    def __next__(self):
        while True:
            if self._it is None:
                if hasattr(self.loader, "set_epoch"):
                    self.loader.set_epoch(self.epoch)
                # A DataLoader draws its base seed from the global RNG at every iter(); isolate that draw so a
                # resumed run (which re-creates the iterator mid-epoch) keeps the same dropout/model RNG stream.
                with torch.random.fork_rng(devices=[]):
                    self._it = iter(self.loader)
                    for _ in range(self.index):
                        next(self._it)
            try:
                batch = next(self._it)
            except StopIteration:
                self.epoch, self.index, self._it = self.epoch + 1, 0, None
                continue
            self.index += 1
            return batch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self._it = int(state["epoch"]), int(state["index"]), None


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def next_batches(streams: dict[str, Iterator], device: torch.device) -> Batches:
    """One batch from every stream, moved to ``device`` (the streams are named like the fields of ``Batches``)."""
    return Batches(**{name: next(stream).to(device) for name, stream in streams.items()})


def train_step(task: StageTask, engine, streams: dict[str, Iterator], device: torch.device,
               accum: int = 1) -> dict[str, torch.Tensor]:
    """One optimizer step: ``accum`` micro-steps through the engine, then the task's after-step hook.

    Returns every loss term summed over the micro-steps, detached and still on the device (no host sync). This is
    the whole training step; the loop and ``distseg bench`` both call it.
    """
    sums: dict[str, torch.Tensor] = {}
    for _ in range(accum):
        losses = task.step(next_batches(streams, device))
        engine.backward(losses["loss"])
        engine.step()
        for key, value in losses.items():
            value = value.detach().float()
            sums[key] = sums[key] + value if key in sums else value
    task.after_step(bool(engine.was_step_applied()))
    return sums


class RunLog:
    """Rank-0 bookkeeping: metrics.jsonl and the rich progress bar."""

    def __init__(self, folder: Path, env: DistEnv, total: int, start: int) -> None:
        self.env = env
        self.path = folder / "metrics.jsonl"
        self.progress = None
        if env.is_main:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self.progress.start()
            self.task = self.progress.add_task(folder.name, total=total, completed=start, info="")

    def write(self, record: dict[str, Any]) -> None:
        if self.env.is_main:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")

    def advance(self, step: int, info: str | None = None) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, **({"info": info} if info is not None else {}))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class Loop:
    """Runs a stage's task for ``train.steps`` optimizer steps (see module docstring)."""

    def __init__(self, task: StageTask, engine, streams: dict[str, "EpochStream"], val_loader, folder: Path,
                 train_cfg, ds_cfg: dict, env: DistEnv, record: dict[str, Any]) -> None:
        self.task, self.engine, self.streams, self.val_loader = task, engine, streams, val_loader
        self.folder, self.cfg, self.env, self.record = folder, train_cfg, env, record
        self.accum = int(ds_cfg["gradient_accumulation_steps"])
        self.images_per_step = int(ds_cfg["train_batch_size"])
        self.step = 0
        self.best: dict[str, Any] = {"score": float("-inf"), "step": None, "metrics": None}
        self.ckpt_dir = folder / "checkpoint"

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """All ranks write their DeepSpeed shards; rank 0 marks the tag COMPLETE only after everyone finished."""
        tag = f"step{self.step:08d}"
        self.task.sync()
        client = {"step": self.step, "best": self.best,
                  "streams": {name: s.state() for name, s in self.streams.items()}}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client)
        tag_dir = self.ckpt_dir / tag
        torch.save(_rng_state(), tag_dir / f"rng_rank{self.env.rank}.pt")
        if self.env.is_main:
            self.task.save_extra(tag_dir)
        barrier()
        if self.env.is_main:
            (tag_dir / ckpt.COMPLETE).write_text(str(self.step))
            ckpt.prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints)
        barrier()

    def resume(self) -> bool:
        """Load the newest complete checkpoint, if any; returns whether one was found."""
        tag = broadcast_object(ckpt.latest_complete_tag(self.ckpt_dir) if self.env.is_main else None)
        if tag is None:
            return False
        path, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        if path is None:
            raise ckpt.CheckpointError(f"{self.ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
        self.step, self.best = int(client["step"]), client["best"]
        for name, stream in self.streams.items():
            stream.load_state(client["streams"][name])
        rng_file = self.ckpt_dir / tag / f"rng_rank{self.env.rank}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        self.task.load_extra(self.ckpt_dir / tag)
        return True

    # -- evaluation --------------------------------------------------------------------------------------------
    def evaluate(self, log: RunLog) -> dict[str, Any] | None:
        """Validate (if the task does) and export a new best model; every rank takes part."""
        self.task.sync()
        metrics = self.task.evaluate(self.val_loader)
        if metrics is None:
            return None
        log.write({"step": self.step, "eval": metrics})
        if metrics["score"] > self.best["score"]:
            self.best = {"score": metrics["score"], "step": self.step, "metrics": metrics}
            if self.env.is_main:
                self.task.export(self.folder / "best")
        barrier()
        return metrics

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any] | None:
        log = RunLog(self.folder, self.env, self.cfg.steps, self.step)
        sums: dict[str, torch.Tensor] = {}
        count = 0
        t_last, step_last = time.perf_counter(), self.step
        try:
            while self.step < self.cfg.steps:
                for key, value in train_step(self.task, self.engine, self.streams, self.env.device,
                                             self.accum).items():
                    sums[key] = sums[key] + value if key in sums else value
                count += self.accum
                self.step += 1
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                    now = time.perf_counter()
                    rate = (self.step - step_last) * self.images_per_step / max(now - t_last, 1e-9)
                    t_last, step_last = now, self.step
                    self._log_losses(log, sums, count, rate)
                    sums, count = {}, 0
                log.advance(self.step)
                last = self.step == self.cfg.steps
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and not last:
                    self.evaluate(log)
                if self.cfg.ckpt_every and self.step % self.cfg.ckpt_every == 0 and not last:
                    self.save_checkpoint()
            final = self.evaluate(log)
            self.save_checkpoint()
        finally:
            log.close()
        return final

    def _log_losses(self, log: RunLog, sums: dict[str, torch.Tensor], count: int, rate: float) -> None:
        """One host sync for all accumulated loss terms (means over ``count`` micro-steps), then log them."""
        if not sums:
            return
        keys = list(sums)
        flat = (torch.cat([sums[k].reshape(-1) for k in keys]) / count).tolist()
        values: dict[str, Any] = {}
        offset = 0
        for key in keys:
            n = sums[key].numel()
            values[key] = flat[offset] if n == 1 and sums[key].dim() == 0 else flat[offset:offset + n]
            offset += n
        lr = self.engine.get_lr()[0]
        log.write({"step": self.step, "lr": lr, "images_per_s": rate, **values})
        log.advance(self.step, " ".join(f"{k}={v:.4f}" for k, v in values.items() if isinstance(v, float))
                    + f" lr={lr:.2e} {rate:.1f} img/s")


def finalize(loop: Loop, fisher) -> None:
    """Put the best weights (the last ones when the task does not validate) at the folder root, compute the Fisher
    (``fisher(folder)``, rank 0, or None), run the task's final work and mark the stage finished."""
    folder, task, env, record = loop.folder, loop.task, loop.env, loop.record
    if env.is_main:
        task.export(folder / "last")
        chosen = folder / "best" if loop.best["step"] is not None else folder / "last"
        for f in chosen.iterdir():  # the weights and whatever the task exports beside them (figures)
            if f.is_file():
                shutil.copy2(f, folder / f.name)
        if fisher is not None:
            fisher(folder)
    barrier()
    task.finish(folder)
    divergence = {name: rank_divergence(module) for name, module in task.replicas().items()}
    if env.is_main:
        record.update(finished=True, steps=loop.step, best_step=loop.best["step"],
                      metrics=loop.best["metrics"] or {}, rank_divergence=divergence)
        ckpt.write_json_atomic(folder / ckpt.STAGE_JSON, record)
    barrier()
