"""Stage C: the semi-supervised mean teacher.

Per micro-step: a labelled batch and an unlabelled batch; the EMA teacher labels the weak view under averaged
test-time augmentation; one fused op turns its probabilities into pseudo-labels and a keep mask; the student sees the
strong view of the same crops and minimises L_sup + λ_u(t)·L_cons. The strong view is photometric, plus CutMix boxes
when ``data.stream.augment.cutmix_prob > 0``: the loader's mixing plan is then applied to the pseudo-labels, the keep
mask and the teacher probabilities too, so every target still lines up with its pixel. The teacher follows the
student by EMA after every applied optimizer step.

The student runs two forwards per micro-step, labelled then unlabelled, rather than one on the concatenation, and
BatchNorm running statistics are updated by the labelled forward only (:func:`running_stats_frozen` around the strong
one). Those statistics are what the EMA hands to the teacher and what evaluation uses: letting grayscale, jittered
and blurred views into them cost 0.02-0.04 val mIoU even with λ_u = 0, and one concatenated forward also normalises
the clean labelled images with statistics shared with the strong views. Measurements: docs/ssl_findings.md.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from distseg.data.augment import apply_cutmix
from distseg.data.manifest import read_manifest
from distseg.engine import checkpoint as ckpt
from distseg.engine.distributed import sync_bn_buffers
from distseg.engine.loop import EpochStream
from distseg.losses import consistency_loss, supervised_loss
from distseg.models.weights import save_weights
from distseg.ops.ema import EMA
from distseg.ops.pseudo import PseudoLabels, pseudo_label, tta_probs
from distseg.stages.base import StageBase, run_stage
from distseg.stages.common import build_from, evaluate_model, frozen, make_loader, parent_matching

STUDENT_WEIGHTS = "student.safetensors"


def rampup(step: int, length: int) -> float:
    """Sigmoid ramp-up exp(−5(1 − t)²) from 0 to 1 over ``length`` steps (1 when length is 0)."""
    if length <= 0 or step >= length:
        return 1.0
    t = step / length
    return math.exp(-5.0 * (1.0 - t) ** 2)


@contextlib.contextmanager
def running_stats_frozen(layers: list[nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    """BatchNorm layers still normalise with batch statistics but leave their running statistics unchanged.

    Momentum 0 makes the running-average update an identity, without touching the autograd path.
    """
    saved = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(layers, saved):
            m.momentum = momentum


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
        self.bn_layers = [m for m in self.engine.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def build_models(self) -> tuple[nn.Module, list[nn.Parameter]]:
        parent = parent_matching(self.cfg.parent, self.cfg.model, self.class_map, "start model")
        student = build_from(parent)
        self.teacher = frozen(copy.deepcopy(student)).to(self.env.device)
        self.model_cfg = dataclasses.replace(parent.model_cfg, pretrained=None)
        return student, list(student.parameters())

    def forward(self) -> dict[str, torch.Tensor]:
        opts = self.cfg.ssl
        images, masks = self.next_labelled()
        strong, labels, keep, soft, pl = self.pseudo_targets()
        with self.autocast:
            logits_l = self.engine(images).float()
            with running_stats_frozen(self.bn_layers):
                logits_u = self.engine(strong).float()
        sup = supervised_loss(logits_l, masks, self.cfg.loss)
        cons = consistency_loss(logits_u, labels, keep, kind=opts.consistency, teacher_probs=soft)
        weight = opts.lambda_u * rampup(self.engine.global_steps, opts.rampup_steps)
        return {"loss": sup + weight * cons, "sup": sup.detach(), "cons": cons.detach(),
                "kept_fraction": pl.kept_fraction.mean(), "confidence": pl.mean_confidence.mean(),
                "entropy": pl.mean_entropy.mean(), "class_hist": pl.class_hist.float()}

    def pseudo_targets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, PseudoLabels]:
        """The strong view and its targets: labels, keep mask, teacher probs (KL only, else None), after CutMix.

        The statistics in the returned :class:`PseudoLabels` describe the teacher's output before mixing.
        """
        opts, dev = self.cfg.ssl, self.env.device
        unl = next(self.unl_stream)
        weak = unl["image"].to(dev, non_blocking=True)
        strong = unl["image_strong"].to(dev, non_blocking=True)
        with self.autocast:
            probs = tta_probs(self.teacher, weak, opts.tta, opts.brightness)
        pl = pseudo_label(probs, tau=opts.tau, max_entropy=opts.max_entropy, from_logits=False,
                          ignore_index=self.class_map.ignore_index, tile_keep_quantile=opts.tile_keep_quantile)
        labels, keep = pl.labels, pl.keep
        soft = probs if opts.consistency == "kl" else None
        if "cutmix_box" in unl:
            box = unl["cutmix_box"].to(dev, non_blocking=True)
            index = unl["cutmix_index"].to(dev, non_blocking=True)
            labels, keep = apply_cutmix(labels, box, index), apply_cutmix(keep, box, index)
            soft = apply_cutmix(soft, box, index) if soft is not None else None
        return strong, labels, keep, soft, pl

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
