"""What head, distill and ssl stages share: engine, data streams, evaluation, export and the run itself."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distseg.data.classes import ClassMap
from distseg.data.manifest import read_manifest
from distseg.engine import checkpoint as ckpt
from distseg.engine.deepspeed_engine import autocast_context, build_engine
from distseg.engine.distributed import DistEnv, init_distributed, maybe_convert_sync_bn, sync_bn_buffers
from distseg.engine.loop import EpochStream, Trainer, finalize
from distseg.models.weights import save_weights
from distseg.stages.common import data_class_map, evaluate_model, make_loader, prepare_folder, resolved_config


class StageBase:
    """A stage program (see ``distseg.engine.loop.StageProgram``) minus its model set-up and loss.

    Subclasses build ``self.student`` (and teachers) in :meth:`build_models`, and compute the loss dict in
    :meth:`forward`. Everything is validated before the run folder is touched.
    """

    kind = "base"

    def __init__(self, cfg, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.class_map: ClassMap = data_class_map(cfg.data.shards)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.parent_ref: str | None = cfg.parent
        self.student, params = self.build_models()
        self.student = maybe_convert_sync_bn(self.student, env)
        self.engine, self.ds_cfg = build_engine(
            self.student, params, ds_config=cfg.ds_config, optim=cfg.optim, total_steps=cfg.train.steps, env=env,
            micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum, global_batch=cfg.global_batch)
        self.micro = int(self.ds_cfg["train_micro_batch_size_per_gpu"])
        self.autocast = autocast_context(self.ds_cfg, env.device)
        self.train_stream = EpochStream(make_loader(cfg.data.shards, cfg.data.train_split, cfg.data.stream, env,
                                                    batch_size=self.micro, train=True, seed=cfg.train.seed))
        self.streams = [self.train_stream]
        self.val_loader = make_loader(cfg.data.shards, cfg.data.val_split, cfg.data.stream, env,
                                      batch_size=cfg.train.eval_batch_size, train=False)

    # -- to implement ----------------------------------------------------------------------------------------------
    def build_models(self) -> tuple[nn.Module, list[nn.Parameter]]:
        raise NotImplementedError

    def forward(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # -- shared behaviour ------------------------------------------------------------------------------------------
    def next_labelled(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(self.train_stream)
        return (batch["image"].to(self.env.device, non_blocking=True),
                batch["mask"].to(self.env.device, non_blocking=True))

    def after_step(self, applied: bool) -> None:
        """Nothing by default; the SSL stage updates its EMA teacher here."""

    def evaluate(self) -> dict[str, Any]:
        result = evaluate_model(self.engine.module, self.val_loader, self.class_map, self.env, self.autocast)
        return {"score": result["miou"] if result["miou"] is not None else 0.0, "student": result}

    def sync(self) -> None:
        """Make BN buffers identical on every rank (collective: all ranks call it before evaluating or saving)."""
        sync_bn_buffers(self.engine.module)

    def replicas(self) -> dict[str, nn.Module]:
        return {"student": self.engine.module}

    def export(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_weights(self.engine.module, folder / ckpt.WEIGHTS, {"kind": self.kind})

    def save_extra(self, folder: Path) -> None:
        """Nothing beyond DeepSpeed's own state by default."""

    def load_extra(self, folder: Path) -> None:
        """Nothing beyond DeepSpeed's own state by default."""

    def finish(self, folder: Path) -> None:
        """Save the diagonal Fisher of the final (best) model on this stage's training data, for the next EWC."""
        if self.cfg.train.fisher_batches and self.env.is_main:
            from distseg.stages.fisher import fisher_for_stage

            fisher_for_stage(folder, self.cfg.data.shards, self.cfg.data.train_split, self.cfg.data.stream,
                             self.cfg.train.fisher_batches, batch_size=self.micro, device=self.env.device)

    def record(self) -> dict[str, Any]:
        labelled = read_manifest(self.cfg.data.shards)["splits"].get(self.cfg.data.train_split, {})
        return ckpt.stage_record(self.kind, resolved_config(self.cfg, self.model_cfg, self.ds_cfg),
                                 self.class_map.to_dict(), self.parent_ref, world_size=self.env.world_size,
                                 labeled_samples=labelled.get("samples", 0), unlabeled_samples=0)


def run_stage(program_cls, cfg, *, resume: bool = False, force: bool = False, local_rank: int | None = None,
              device: str | None = None) -> dict[str, Any]:
    """Run one stage end to end in this process (one rank of the job) and return its final stage record."""
    env = init_distributed(local_rank, device)
    program = program_cls(cfg, env)
    record = program.record()
    folder = prepare_folder(cfg.out, record, env, resume=resume, force=force)
    trainer = Trainer(program, folder, cfg.train, program.ds_cfg, env, record)
    if resume and trainer.resume() and env.is_main:
        print(f"resumed {folder} at step {trainer.step}")
    trainer.run()
    finalize(folder, program, trainer, env, record)
    return record


