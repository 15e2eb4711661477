"""The one training loop every stage shares.

A stage's task returns a loss dict from ``step(batches)``; the loop owns everything else: drawing the batches of the
streams the stage declared, micro-steps and gradient accumulation through the DeepSpeed engine, logging without
host syncs in the step, evaluation and best-model tracking, checkpoints that are safe to resume from after a
``kill -9`` (falling back to an older checkpoint when the newest one is damaged), skipping steps whose loss or
gradients are not finite (and stopping after too many in a row), and finishing the stage folder.
"""
from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Protocol

import torch

from distseg.data.batch import Batches
from distseg.engine import checkpoint as ckpt
from distseg.engine.cost import StageCost
from distseg.engine.distributed import (DistEnv, barrier, broadcast_object, gather_objects, rank_divergence,
                                        sum_counts)
from distseg.engine.finite import NonFiniteError, StepGuard, nonfinite_modules
from distseg.engine.runlog import RunLog
from distseg.engine.state import StageState


class StageInputs(Protocol):
    """What the loop draws from (``distseg.stages.data.StageData`` implements it)."""

    streams: dict[str, "EpochStream"]
    """The endless train streams, named like the fields of ``Batches``."""
    val_loader: Any
    """The validation loader, or None."""


class StageTask(Protocol):
    """What the loop calls on a stage's task (``distseg.stages.task.Task`` implements it)."""

    cfg: Any
    """The stage config: the loop reads ``cfg.train``."""
    env: DistEnv

    state: StageState
    """The task's declared modules and objects: synced, checked, checkpointed and resumed by the loop."""

    def step(self, batches: Batches) -> dict[str, torch.Tensor]:
        """Losses of one micro-step on the given batches (``'loss'`` is the one optimised)."""

    def evaluate(self, loader) -> dict[str, Any] | None:
        """Validate; metrics with a ``'score'`` key (higher is better) keep the best model; None: no validation."""

    def export(self, folder: Path) -> None:
        """Write the weights a later stage or ``predict`` uses (rank 0 only; no collectives here)."""

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

    @property
    def corrupt_total(self) -> int:
        """Corrupt samples the loader skipped on this rank so far (0 for loaders that do not count)."""
        return int(getattr(self.loader, "corrupt_total", 0))


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


class StepResult(NamedTuple):
    """What one optimizer step returns."""

    losses: dict[str, torch.Tensor]
    """Every loss term summed over the micro-steps, detached and still on the device (no host sync)."""
    applied: bool
    """Whether the weights changed (False: a non-finite loss or gradient, or an fp16 overflow, skipped it)."""


def train_step(task: StageTask, engine, streams: dict[str, Iterator], device: torch.device,
               accum: int = 1, guard: StepGuard | None = None) -> StepResult:
    """One optimizer step: ``accum`` micro-steps through the engine, then the task's after-step hook.

    With a ``guard`` (the one the engine's optimizer asks), a step whose loss or gradients are not finite on any rank
    is skipped on every rank, and the task state's ``after_step(False)`` keeps an EMA teacher away from it. This is the whole
    training step; the loop and ``distseg bench`` both call it.
    """
    sums: dict[str, torch.Tensor] = {}
    if guard is not None:
        guard.begin()
    for _ in range(accum):
        losses = task.step(next_batches(streams, device))
        if guard is not None:
            guard.watch(losses["loss"])
        engine.backward(losses["loss"])
        engine.step()
        for key, value in losses.items():
            value = value.detach().float()
            sums[key] = sums[key] + value if key in sums else value
    applied = guard.applied(engine) if guard is not None else bool(engine.was_step_applied())
    task.state.after_step(applied)
    return StepResult(sums, applied)


class Loop:
    """Runs a stage's task for ``train.steps`` optimizer steps (see module docstring)."""

    def __init__(self, task: StageTask, engine, data: StageInputs, folder: Path, record: dict[str, Any],
                 guard: StepGuard | None = None) -> None:
        self.task, self.engine, self.folder, self.record, self.guard = task, engine, folder, record, guard
        self.streams, self.val_loader = data.streams, data.val_loader
        self.cfg, self.env = task.cfg.train, task.env
        self.accum = int(engine.gradient_accumulation_steps())
        self.images_per_step = int(engine.train_batch_size())
        self.step = 0
        self.best: dict[str, Any] = {"score": float("-inf"), "step": None, "metrics": None}
        self.skipped = 0
        """Optimizer steps skipped so far (non-finite loss or gradients, fp16 overflow)."""
        self.nonfinite: list[str] = []
        """Models found non-finite (weights or validation outputs) by the latest evaluation."""
        self.corrupt = {name: 0 for name in self.streams}
        """Corrupt samples skipped so far, summed over ranks, by stream."""
        self._corrupt_local = {name: 0 for name in self.streams}
        self.cost = StageCost()
        """The cost of the steps so far, over every piece of an interrupted run."""
        self.ckpt_dir = folder / "checkpoint"

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """All ranks write their DeepSpeed shards; rank 0 marks the tag COMPLETE only after everyone finished.

        Weights with a NaN or inf are never checkpointed (nor, as the final checkpoint comes first, exported): the
        stage stops instead, on every rank, and the previous checkpoint stays the resume point. A tag folder left
        from an earlier timeline is removed first. If any rank fails to write (a full disk), every rank raises
        together and rank 0 removes the half-written tag.
        """
        tag = f"step{self.step:08d}"
        tag_dir = self.ckpt_dir / tag
        self.task.state.sync()
        bad = nonfinite_modules(self.task.state.replicas())  # replicas are identical, so every rank agrees
        if bad:
            raise NonFiniteError(f"{self.folder}: the {', '.join(bad)} weights are not finite (NaN/inf) at step "
                                 f"{self.step}: training diverged, so they are neither checkpointed nor exported "
                                 f"(best/ holds step {self.best['step']}); lower optim.lr")
        if self.env.is_main and tag_dir.exists():
            shutil.rmtree(tag_dir)
        barrier()
        client = {"step": self.step, "best": self.best, "skipped": self.skipped, "corrupt": self.corrupt,
                  "streams": {name: s.state() for name, s in self.streams.items()},
                  "cost": self.cost.snapshot(self.step)}
        problem = None
        try:
            self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client)
            torch.save(_rng_state(), tag_dir / f"rng_rank{self.env.rank}.pt")
            if self.env.is_main:
                self.task.state.save(tag_dir)
        except (OSError, RuntimeError, ValueError) as exc:  # torch and safetensors report a failed write their way
            problem = f"rank {self.env.rank}: {type(exc).__name__}: {exc}"
        problem = _first(gather_objects(problem))
        if problem is not None:
            if self.env.is_main:
                shutil.rmtree(tag_dir, ignore_errors=True)
            raise ckpt.CheckpointError(f"{tag_dir}: could not write the checkpoint ({problem}); removed it, so a "
                                       f"resume continues from the previous complete one")
        barrier()
        if self.env.is_main:
            (tag_dir / ckpt.COMPLETE).write_text(str(self.step))
            ckpt.prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints)
        barrier()

    def resume(self) -> bool:
        """Load the newest usable complete checkpoint; returns whether there was one.

        A tag is used only when every rank can read every file it needs (checked before DeepSpeed touches the
        engine) and loads it; otherwise all ranks move on to the next older complete tag together. When complete
        tags exist but none is usable, the resume fails naming each tag's problem.
        """
        tags = broadcast_object(ckpt.complete_tags(self.ckpt_dir) if self.env.is_main else None)
        problems = []
        for tag in tags:
            problem = _first(gather_objects(ckpt.tag_problem(self.ckpt_dir / tag, self.env.rank)))
            if problem is None:
                problem = _first(gather_objects(self._load(tag)))
            if problem is None:
                if self.env.is_main:
                    for bad, why in zip(tags, problems):  # never offered again; kept for inspection
                        ckpt.mark_unusable(self.ckpt_dir / bad, why)
                return True
            problems.append(problem)
            if self.env.is_main:
                print(f"warning: not resuming from {tag}: {problem}")
        if problems:
            raise ckpt.CheckpointError(f"{self.ckpt_dir}: no usable checkpoint ({'; '.join(problems)})")
        return False

    def _load(self, tag: str) -> str | None:
        """Load one checkpoint tag into the engine, the streams, the RNG and the task; None, or what failed."""
        tag_dir = self.ckpt_dir / tag
        try:
            path, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
            if path is None:
                return f"{tag_dir}: DeepSpeed could not load this checkpoint"
            step, best = int(client["step"]), client["best"]
            skipped, corrupt = int(client.get("skipped", 0)), dict(client.get("corrupt", {}))
            states = {name: client["streams"][name] for name in self.streams}
            carried = client.get("cost")
            _set_rng_state(ckpt.safe_load(tag_dir / f"rng_rank{self.env.rank}.pt"))
            self.task.state.load(tag_dir)
        except Exception as exc:  # a readable file with the wrong content: this tag is unusable
            return f"{tag_dir}: {type(exc).__name__}: {exc}"
        self.step, self.best, self.skipped = step, best, skipped
        self.cost.resume_from(carried, step)
        self.corrupt = {name: int(corrupt.get(name, 0)) for name in self.streams}
        for name, stream in self.streams.items():
            stream.load_state(states[name])
        return None

    # -- evaluation --------------------------------------------------------------------------------------------
    def evaluate(self, log: RunLog) -> dict[str, Any] | None:
        """Validate (if the task does) and export a new best model; every rank takes part.

        A model with NaN/inf weights, or whose validation outputs are not finite, is never selected: the evaluation
        is logged with ``nonfinite`` (the names of those models), which ``self.nonfinite`` keeps for the end.
        """
        self.task.state.sync()
        self.nonfinite = nonfinite_modules(self.task.state.replicas())
        if self.nonfinite:
            log.write({"step": self.step, "nonfinite": self.nonfinite})
            return None
        metrics = self.task.evaluate(self.val_loader)
        if metrics is None:
            return None
        self.nonfinite = [name for name, m in metrics.items()
                          if isinstance(m, dict) and not m.get("finite_outputs", True)]
        if self.nonfinite:
            log.write({"step": self.step, "eval": metrics, "nonfinite": self.nonfinite})
            return None
        log.write({"step": self.step, "eval": metrics}, prefix="eval")
        if metrics["score"] > self.best["score"]:
            self.best = {"score": metrics["score"], "step": self.step, "metrics": metrics}
            if self.env.is_main:
                self.task.export(self.folder / "best")
        barrier()
        return metrics

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any] | None:
        log = RunLog(self.folder, self.env, self.cfg.steps, self.step, getattr(self.engine, "monitor", None))
        sums: dict[str, torch.Tensor] = {}
        count, in_a_row, skipped_before = 0, 0, self.skipped
        t_last, step_last = time.perf_counter(), self.step
        if self.step < self.cfg.steps:
            log.starting(self.step)
        try:
            while self.step < self.cfg.steps:
                result = train_step(self.task, self.engine, self.streams, self.env.device, self.accum, self.guard)
                self.step += 1
                if result.applied:  # a skipped step's losses (NaN) stay out of the logged means
                    for key, value in result.losses.items():
                        sums[key] = sums[key] + value if key in sums else value
                    count, in_a_row = count + self.accum, 0
                else:
                    self.skipped, in_a_row = self.skipped + 1, in_a_row + 1
                    self._check_skips(in_a_row)
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                    now = time.perf_counter()
                    rate = (self.step - step_last) * self.images_per_step / max(now - t_last, 1e-9)
                    t_last, step_last = now, self.step
                    self._log_losses(log, sums, count, rate, self.skipped - skipped_before)
                    sums, count, skipped_before = {}, 0, self.skipped
                log.advance(self.step)
                last = self.step == self.cfg.steps
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and not last:
                    self.evaluate(log)
                if self.cfg.ckpt_every and self.step % self.cfg.ckpt_every == 0 and not last:
                    self.save_checkpoint()
            final = self.evaluate(log)
            if self.nonfinite:
                raise NonFiniteError(f"{self.folder}: the {', '.join(self.nonfinite)} model's weights or validation "
                                     f"outputs are not finite (NaN/inf) at the end: training diverged, so nothing "
                                     f"is exported (best/ holds step {self.best['step']}); lower optim.lr")
            self.save_checkpoint()
        finally:
            log.close()
        return final

    def _check_skips(self, in_a_row: int) -> None:
        """Stop (on every rank: the skip decision is collective) after too many skipped steps in a row."""
        if in_a_row >= self.cfg.max_skipped_steps:
            raise NonFiniteError(
                f"{self.folder}: {in_a_row} optimizer steps in a row were skipped at step {self.step} because the "
                f"loss or the gradients were not finite (NaN/inf); training diverged. Lower optim.lr or check the "
                f"data; the newest checkpoint holds step {self.step - in_a_row} or earlier (--resume)")

    def _log_losses(self, log: RunLog, sums: dict[str, torch.Tensor], count: int, rate: float, skipped: int) -> None:
        """One host sync for all accumulated loss terms (means over ``count`` micro-steps), then log them with the
        skipped steps and the corrupt samples so far (summed over ranks: every rank logs at the same steps)."""
        keys = list(sums)
        flat = (torch.cat([sums[k].reshape(-1) for k in keys]) / max(count, 1)).tolist() if keys else []
        values: dict[str, Any] = {}
        offset = 0
        for key in keys:
            n = sums[key].numel()
            values[key] = flat[offset] if n == 1 and sums[key].dim() == 0 else flat[offset:offset + n]
            offset += n
        lr = self.engine.get_lr()[0]
        local = {name: s.corrupt_total for name, s in self.streams.items()}
        deltas = sum_counts([local[n] - self._corrupt_local[n] for n in self.streams], self.env.device)
        self._corrupt_local = local
        self.corrupt = {n: self.corrupt[n] + d for n, d in zip(self.streams, deltas)}
        log.write({"step": self.step, "lr": lr, "images_per_s": rate, **values, "skipped_steps": skipped,
                   "corrupt_samples": sum(self.corrupt.values())}, prefix="train")
        log.advance(self.step, " ".join(f"{k}={v:.4f}" for k, v in values.items() if isinstance(v, float))
                    + f" lr={lr:.2e} {rate:.1f} img/s" + (f" skipped={skipped}" if skipped else ""))


def _first(problems: list[str | None]) -> str | None:
    """The first rank's problem, if any rank had one."""
    return next((p for p in problems if p is not None), None)


def finalize(loop: Loop, fisher) -> None:
    """Put the best weights (the last ones when the task does not validate) at the folder root, compute the Fisher
    (``fisher(folder)``, rank 0, or None), run the task's final work and mark the stage finished with what its
    schedule cost over every piece (:mod:`distseg.engine.cost`). The loop's final checkpoint, just before, has
    checked that the weights are finite."""
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
    divergence = {name: rank_divergence(module) for name, module in task.state.replicas().items()}
    cost = loop.cost.snapshot(loop.step)
    if env.is_main:
        record.update(finished=True, steps=loop.step, best_step=loop.best["step"],
                      metrics=loop.best["metrics"] or {}, rank_divergence=divergence, skipped_steps=loop.skipped,
                      corrupt_samples=loop.corrupt, cost=cost)
        ckpt.write_json_atomic(folder / ckpt.STAGE_JSON, record)
    barrier()
