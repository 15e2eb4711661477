"""Stage C: the semi-supervised mean teacher.

Per micro-step: a labelled batch and an unlabelled batch; the EMA teacher labels the weak view under averaged
test-time augmentation; one fused op turns its probabilities into pseudo-labels and a keep mask; the student sees the
strong view of the same crops (photometric only, so the geometry of labels and mask is unchanged) and minimises
L_sup + λ_u(t)·L_cons. The teacher follows the student by EMA after every applied optimizer step.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from distseg.data.manifest import read_manifest
from distseg.engine import checkpoint as ckpt
from distseg.engine.distributed import sync_bn_buffers
from distseg.engine.loop import EpochStream
from distseg.losses import consistency_loss, supervised_loss
from distseg.models.weights import save_weights
from distseg.ops.ema import EMA
from distseg.ops.pseudo import pseudo_label, tta_probs
from distseg.stages.base import StageBase, run_stage
from distseg.stages.common import StageError, build_from, evaluate_model, frozen, make_loader, resolve_parent

STUDENT_WEIGHTS = "student.safetensors"


def rampup(step: int, length: int) -> float:
    """Sigmoid ramp-up exp(−5(1 − t)²) from 0 to 1 over ``length`` steps (1 when length is 0)."""
    if length <= 0 or step >= length:
        return 1.0
    t = step / length
    return math.exp(-5.0 * (1.0 - t) ** 2)


class SSLStage(StageBase):
    kind = "ssl"

    def __init__(self, cfg, env) -> None:
        super().__init__(cfg, env)
        opts = cfg.ssl
        self.ema = EMA(self.teacher, self.engine.module, alpha=opts.ema_alpha,
                       warmup_steps=1000 if opts.ema_warmup else 0)
        shards = opts.unlabeled_shards or cfg.data.shards
        self.unlabeled_shards = shards
        self.unl_stream = EpochStream(make_loader(
            shards, opts.unlabeled_split, cfg.data.stream, env, batch_size=self.micro * opts.unlabeled_ratio,
            train=True, views=("weak", "strong"), sample_fraction=opts.unlabeled_fraction, seed=cfg.train.seed + 1))
        self.streams = [self.train_stream, self.unl_stream]

    def build_models(self) -> tuple[nn.Module, list[nn.Parameter]]:
        parent = resolve_parent(self.cfg.parent, self.cfg.model)
        if parent.class_map is not None and parent.class_map != self.class_map:
            raise StageError(f"{self.cfg.parent}: the start model's classes {parent.class_map.names} differ from the "
                             f"data's {self.class_map.names}; run a head stage on this data first")
        if parent.model_cfg.num_classes != self.class_map.num_classes:
            raise StageError(f"{self.cfg.parent}: the start model predicts {parent.model_cfg.num_classes} classes "
                             f"but the data has {self.class_map.num_classes}")
        student = build_from(parent)
        self.teacher = frozen(copy.deepcopy(student)).to(self.env.device)
        self.model_cfg = dataclasses.replace(parent.model_cfg, pretrained=None)
        return student, list(student.parameters())

    def forward(self) -> dict[str, torch.Tensor]:
        opts, dev = self.cfg.ssl, self.env.device
        images, masks = self.next_labelled()
        unl = next(self.unl_stream)
        weak = unl["image"].to(dev, non_blocking=True)
        strong = unl["image_strong"].to(dev, non_blocking=True)
        with self.autocast:
            probs = tta_probs(self.teacher, weak, opts.tta, opts.brightness)
        pl = pseudo_label(probs, tau=opts.tau, max_entropy=opts.max_entropy, from_logits=False,
                          ignore_index=self.class_map.ignore_index, tile_keep_quantile=opts.tile_keep_quantile)
        with self.autocast:
            logits = self.engine(torch.cat([images, strong])).float()
        sup = supervised_loss(logits[: images.shape[0]], masks, self.cfg.loss)
        cons = consistency_loss(logits[images.shape[0]:], pl.labels, pl.keep, kind=opts.consistency,
                                teacher_probs=probs if opts.consistency == "kl" else None)
        weight = opts.lambda_u * rampup(self.engine.global_steps, opts.rampup_steps)
        return {"loss": sup + weight * cons, "sup": sup.detach(), "cons": cons.detach(),
                "kept_fraction": pl.kept_fraction.mean(), "confidence": pl.mean_confidence.mean(),
                "entropy": pl.mean_entropy.mean(), "class_hist": pl.class_hist.float()}

    def after_step(self, applied: bool) -> None:
        self.ema.update(applied)

    def sync(self) -> None:
        super().sync()
        sync_bn_buffers(self.teacher)

    def replicas(self) -> dict[str, nn.Module]:
        return {"student": self.engine.module, "teacher": self.teacher}

    def evaluate(self) -> dict[str, Any]:
        teacher = evaluate_model(self.teacher, self.val_loader, self.class_map, self.env, self.autocast)
        student = evaluate_model(self.engine.module, self.val_loader, self.class_map, self.env, self.autocast)
        self.teacher.eval()
        return {"score": teacher["miou"] or 0.0, "teacher": teacher, "student": student}

    def export(self, folder: Path) -> None:
        """``model.safetensors`` is the teacher (the model to deploy); the student is kept beside it."""
        folder.mkdir(parents=True, exist_ok=True)
        save_weights(self.teacher, folder / ckpt.WEIGHTS, {"kind": "ssl-teacher"})
        save_weights(self.engine.module, folder / STUDENT_WEIGHTS, {"kind": "ssl-student"})

    def save_extra(self, folder: Path) -> None:
        save_weights(self.teacher, folder / ckpt.TEACHER_WEIGHTS, {"kind": "ema-teacher"})
        torch.save(self.ema.state_dict(), folder / "ema_state.pt")

    def load_extra(self, folder: Path) -> None:
        state = load_file(str(folder / ckpt.TEACHER_WEIGHTS), device=str(self.env.device))
        self.teacher.load_state_dict(state)
        self.ema.load_state_dict(torch.load(folder / "ema_state.pt", weights_only=True))

    def record(self) -> dict[str, Any]:
        record = super().record()
        total = read_manifest(self.unlabeled_shards)["splits"].get(self.cfg.ssl.unlabeled_split, {})
        record["unlabeled_samples"] = round(total.get("samples", 0) * self.cfg.ssl.unlabeled_fraction)
        return record


def run(cfg, **kwargs):
    """Run a mean-teacher stage (see :func:`distseg.stages.base.run_stage`)."""
    return run_stage(SSLStage, cfg, **kwargs)
