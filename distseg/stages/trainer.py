"""The trainer: one stage of any kind, end to end, in this process (one rank of the job).

It reads what the kind declares in the registry and builds the rest around the kind's task: the data's class map and
the parent, the DeepSpeed engine around the student, the labelled and unlabelled streams, the validation loader, the
stage folder and its record. The loop (:mod:`distseg.engine.loop`) then draws the batches and hands them to the task.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distseg.data.classes import ClassMap
from distseg.data.manifest import read_manifest
from distseg.engine import checkpoint as ckpt
from distseg.engine.deepspeed_engine import attach_monitor, autocast_context, build_engine
from distseg.engine.distributed import DistEnv, init_distributed, maybe_convert_sync_bn, sum_counts
from distseg.engine.finite import StepGuard
from distseg.engine.loop import EpochStream, Loop, finalize
from distseg.engine.metrics import ConfusionMatrix
from distseg.stages.common import StageError, resolve_parent
from distseg.stages.folder import prepare_folder
from distseg.stages.registry import StageKind, get_kind
from distseg.stages.task import StageContext, Task


def data_class_map(shards: str) -> ClassMap:
    """The class map of a labelled shard folder, with errors that say how to make one."""
    if not shards:
        raise StageError("no training data given (data.shards / --data)")
    if not (Path(shards) / "manifest.json").is_file():
        raise StageError(f"{shards}: not a shard folder (no manifest.json); create it with `distseg shard-data`")
    if read_manifest(shards).get("class_map") is None:
        raise StageError(f"{shards}: holds unlabelled images only (no class map); this stage needs labelled shards")
    return ClassMap.from_manifest(shards)


def check_pool(folders: list[str], split: str) -> int:
    """Every pool folder is a shard folder with ``split``; returns the pool's sample count."""
    total = 0
    for folder in folders:
        if not folder or not (Path(folder) / "manifest.json").is_file():
            raise StageError(f"{folder or '(none)'}: not a shard folder (no manifest.json); the unlabelled pool "
                             f"needs folders written by `distseg shard-data`")
        splits = read_manifest(folder)["splits"]
        if split not in splits:
            raise StageError(f"{folder}: no {split!r} split to use as the unlabelled pool (splits: {sorted(splits)})")
        total += splits[split]["samples"]
    return total


def stage_context(kind: StageKind, cfg, env: DistEnv) -> StageContext:
    """Validate the data and the parent a kind needs, before anything is built or written."""
    kind.check(cfg)
    class_map = data_class_map(cfg.data.shards) if kind.labelled else None
    if kind.unlabelled:
        check_pool(cfg.data.pool(kind.labelled), cfg.data.unlabeled_split)
    parent = resolve_parent(cfg.parent, cfg.model) if cfg.parent else None
    return StageContext(kind=kind, cfg=cfg, env=env, class_map=class_map, parent=parent)


def make_loader(shards: str | list[str], split: str, stream_cfg, env: DistEnv, *, batch_size: int, train: bool,
                views: tuple[str, ...] = ("weak",), sample_fraction: float | None = None, seed: int = 0):
    """A per-rank loader of ``split`` with the micro-batch size DeepSpeed resolved."""
    from distseg.data.stream import build_loader

    changes: dict[str, Any] = {"batch_size": batch_size, "seed": seed}
    if sample_fraction is not None:
        changes["sample_fraction"] = sample_fraction
    cfg = dataclasses.replace(stream_cfg, **changes)
    return build_loader(shards, split, cfg, rank=env.rank, world_size=env.world_size, train=train, views=views)


@torch.no_grad()
def evaluate_model(model: nn.Module, loader, class_map: ClassMap, env: DistEnv, autocast) -> dict[str, Any]:
    """Whole-tile validation: one confusion matrix over the split, summed across ranks.

    ``finite_outputs`` says whether every logit was finite: a diverged model can hold finite weights whose outputs
    overflow, and its argmax would still make a (meaningless) confusion matrix.
    """
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(class_map.num_classes, class_map.ignore_index, device=env.device)
    bad = torch.zeros((), dtype=torch.bool, device=env.device)
    for batch in loader:
        with autocast:
            logits = model(batch.image.to(env.device, non_blocking=True))
        bad |= ~logits.isfinite().all()
        cm.update(logits.argmax(1), batch.mask.to(env.device, non_blocking=True))
    cm.all_reduce()
    model.train(was_training)
    result = cm.compute()
    result["class_names"] = class_map.names
    result["finite_outputs"] = sum_counts([int(bad)], env.device)[0] == 0
    return result


def resolved_config(cfg, model_cfg, ds_cfg: dict) -> dict[str, Any]:
    """The config saved in stage.json: the stage config with the model actually built and the final ds_config."""
    from distseg.config import to_dict

    data = to_dict(cfg)
    data["model"] = to_dict(model_cfg)
    data["ds_config_resolved"] = ds_cfg
    return data


class Trainer:
    """One stage: the kind's task, the engine around its student, and the streams the kind declares."""

    def __init__(self, kind: StageKind, cfg, env: DistEnv) -> None:
        self.kind, self.cfg, self.env = kind, cfg, env
        ctx = stage_context(kind, cfg, env)
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
        self.micro = int(self.ds_cfg["train_micro_batch_size_per_gpu"])
        self.task.bind(self.engine, autocast_context(self.ds_cfg, env.device))
        self.streams = self._streams()
        self.val_loader = None
        if kind.labelled and cfg.data.val_split in read_manifest(cfg.data.shards)["splits"]:
            self.val_loader = make_loader(cfg.data.shards, cfg.data.val_split, cfg.data.stream, env,
                                          batch_size=cfg.train.eval_batch_size, train=False)

    def _streams(self) -> dict[str, EpochStream]:
        """The endless train streams, named like the fields of ``Batches``; seeds differ per stream."""
        cfg, data, streams, wanted = self.cfg, self.cfg.data, {}, self.task.streams()
        if "labelled" in wanted:
            streams["labelled"] = EpochStream(make_loader(data.shards, data.train_split, data.stream, self.env,
                                                          batch_size=self.micro, train=True, seed=cfg.train.seed))
        if "unlabelled" in wanted:
            ratio = data.unlabeled_ratio if self.kind.labelled else 1
            streams["unlabelled"] = EpochStream(make_loader(
                data.pool(self.kind.labelled), data.unlabeled_split, data.stream, self.env,
                batch_size=self.micro * ratio, train=True, views=self.kind.unlabelled_views,
                sample_fraction=data.unlabeled_fraction, seed=cfg.train.seed + 1))
        return streams

    def record(self) -> dict[str, Any]:
        """The stage.json of this run before it trains (metrics and ``finished`` are filled in as it goes)."""
        data = self.cfg.data
        labelled = read_manifest(data.shards)["splits"].get(data.train_split, {}) if self.kind.labelled else {}
        unlabelled = 0
        if "unlabelled" in self.streams:
            unlabelled = round(check_pool(data.pool(self.kind.labelled), data.unlabeled_split)
                               * data.unlabeled_fraction)
        record = ckpt.stage_record(self.kind.name, resolved_config(self.cfg, self.model_cfg, self.ds_cfg),
                                   self.task.class_map.to_dict() if self.task.class_map else None, self.cfg.parent,
                                   world_size=self.env.world_size, labeled_samples=labelled.get("samples", 0),
                                   unlabeled_samples=unlabelled, identity=self.cfg.identity(self.env.world_size))
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
            loop = Loop(self.task, self.engine, self.streams, self.val_loader, folder, self.cfg.train, self.ds_cfg,
                        self.env, record, self.guard)
            if reopened and loop.resume() and self.env.is_main:
                print(f"resumed {folder} at step {loop.step}")
            attach_monitor(self.engine, self.ds_cfg, folder)  # after a resume that may still fail: it writes files
            loop.run()
            finalize(loop, self.fisher())
        finally:
            if lock is not None:
                lock.release()
        return record


def run_stage(kind: str | StageKind, cfg, *, resume: bool = False, force: bool = False,
              local_rank: int | None = None, device: str | None = None) -> dict[str, Any]:
    """Run one stage end to end in this process (one rank of the job) and return its final stage record."""
    kind = get_kind(kind) if isinstance(kind, str) else kind
    env = init_distributed(local_rank, device)
    return Trainer(kind, cfg, env).run(resume=resume, force=force)
