"""The trainer: one stage of any kind, end to end, in this process (one rank of the job).

It reads what the kind declares in the registry and builds the rest around the kind's task: the data's class map and
the parent, the DeepSpeed engine around the student, the labelled and unlabelled streams, the validation loader, the
stage folder and its record. The loop (:mod:`distseg.engine.loop`) then draws the batches and hands them to the task.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distseg.engine import checkpoint as ckpt
from distseg.engine.deepspeed_engine import attach_monitor, autocast_context, build_engine, use_memory_format
from distseg.engine.distributed import DistEnv, init_distributed, maybe_convert_sync_bn
from distseg.engine.finite import StepGuard
from distseg.engine.loop import Loop, finalize
from distseg.stages.common import resolve_parent
from distseg.stages.data import StageData
from distseg.stages.folder import prepare_folder
from distseg.stages.registry import StageKind, get_kind
from distseg.stages.task import StageContext, Task


def stage_context(kind: StageKind, cfg, env: DistEnv) -> tuple[StageContext, StageData]:
    """Validate the data and the parent a kind needs, before anything is built or written."""
    kind.check(cfg)
    data = StageData.check(kind, cfg)
    parent = resolve_parent(cfg.parent, cfg.model) if cfg.parent else None
    return StageContext(kind=kind, cfg=cfg, env=env, class_map=data.class_map, parent=parent, data=data), data


def resolved_config(cfg, model_cfg, ds_cfg: dict) -> dict[str, Any]:
    """The config saved in stage.json: the stage config with the model actually built and the final ds_config."""
    from distseg.config import to_dict

    data = to_dict(cfg)
    data["model"] = to_dict(model_cfg)
    data["ds_config_resolved"] = ds_cfg
    return data


class Trainer:
    """One stage: the kind's task, the engine around its student, and the data the kind declares."""

    def __init__(self, kind: StageKind, cfg, env: DistEnv) -> None:
        self.kind, self.cfg, self.env = kind, cfg, env
        ctx, self.data = stage_context(kind, cfg, env)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.task: Task = kind.task(ctx)
        student = self.task.build()
        self.model_cfg = student.model_cfg
        module = maybe_convert_sync_bn(student.module, env)
        self.guard = StepGuard()
        self.engine, self.ds_cfg = build_engine(
            module, student.params, ds_config=cfg.ds_config, optim=cfg.optim, total_steps=cfg.train.steps, env=env,
            micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum, global_batch=cfg.global_batch, guard=self.guard)
        self.guard.keep_buffers(self.engine.module)
        use_memory_format(self.ds_cfg, self.task.state.beside_engine())
        self.micro = int(self.ds_cfg["train_micro_batch_size_per_gpu"])
        self.task.bind(self.engine, autocast_context(self.ds_cfg, env.device))
        self.data.open(self.task.streams(), env, micro=self.micro, eval_batch=cfg.train.eval_batch_size,
                       seed=cfg.train.seed)

    def record(self) -> dict[str, Any]:
        """The stage.json of this run before it trains (metrics and ``finished`` are filled in as it goes)."""
        record = ckpt.stage_record(self.kind.name, resolved_config(self.cfg, self.model_cfg, self.ds_cfg),
                                   self.data.class_map.to_dict() if self.data.class_map else None, self.cfg.parent,
                                   world_size=self.env.world_size, **self.data.counts(),
                                   identity=self.cfg.identity(self.env.world_size))
        record.update(self.task.record())
        return record

    def fisher(self):
        """The end-of-stage Fisher writer for labelled kinds (None when off or without labels)."""
        if not (self.kind.labelled and self.cfg.train.fisher_batches):
            return None
        from distseg.fisher import fisher_for_stage

        data = self.cfg.data

        def write(folder: Path) -> None:
            fisher_for_stage(folder, data.shards, data.train_split, data.stream, self.cfg.train.fisher_batches,
                             batch_size=self.micro, device=self.env.device)
        return write

    def run(self, *, resume: bool = False, force: bool = False) -> dict[str, Any]:
        """Train into ``cfg.out`` (resuming from its newest usable checkpoint when asked); the final record.

        The folder stays locked against other processes until the stage ends.
        """
        record = self.record()
        folder, reopened, lock = prepare_folder(self.cfg.out, record, self.env, resume=resume, force=force)
        try:
            loop = Loop(self.task, self.engine, self.data, folder, record, self.guard)
            if reopened and loop.resume() and self.env.is_main:
                print(f"resumed {folder} at step {loop.step}")
            attach_monitor(self.engine, self.ds_cfg, folder)  # after a resume that may still fail: it writes files
            loop.run()
            finalize(loop, self.fisher())
        finally:
            self.close()
            if lock is not None:
                lock.release()
        return record

    def close(self) -> None:
        """Release the engine's hooks, so that the engine, its optimizer and their process groups can be freed.

        ZeRO's gradient hooks tie the optimizer to the parameters through autograd's C++ nodes, a cycle garbage
        collection cannot see: without this the memory (GPU memory in a bench sweep) and the process groups stay.
        """
        self.engine.destroy()


def run_stage(kind: str | StageKind, cfg, *, resume: bool = False, force: bool = False,
              local_rank: int | None = None, device: str | None = None) -> dict[str, Any]:
    """Run one stage end to end in this process (one rank of the job) and return its final stage record."""
    kind = get_kind(kind) if isinstance(kind, str) else kind
    env = init_distributed(local_rank, device)
    return Trainer(kind, cfg, env).run(resume=resume, force=force)
