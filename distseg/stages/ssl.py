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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from safetensors.torch import load_file
from torch import nn

from distseg.data.augment import apply_cutmix
from distseg.data.batch import Batch, Batches
from distseg.engine import checkpoint as ckpt
from distseg.engine.distributed import sync_bn_buffers
from distseg.losses import consistency_loss, supervised_loss
from distseg.models.weights import save_weights
from distseg.ops.ema import EMA
from distseg.ops.pseudo import PseudoLabels, pseudo_label, tta_probs
from distseg.ops.thresholds import ClassThresholds
from distseg.stages.common import build_from, frozen, parent_matching
from distseg.stages.registry import StageKind
from distseg.stages.task import Student, Task, labelled

STUDENT_WEIGHTS = "student.safetensors"
CLASS_TAU_STATE = "class_tau.pt"


@dataclass
class SSLOptions:
    """Stage C: mean teacher with filtered pseudo-labels (the pool itself is ``data.unlabeled``)."""

    tau: float = 0.95
    adaptive_tau: bool = False
    """Per-class thresholds τ·σ_c/max σ from the teacher's running confidence per class (ops/thresholds.py), so
    the classes it is less sure of still reach the loss; False keeps one τ for all."""
    max_entropy: float | None = None
    """Drop pixels whose normalised entropy is above this (None: no entropy bound)."""
    tile_keep_quantile: float | None = None
    """Keep only the tiles whose mean entropy is among the lowest q of the batch (None: keep all)."""
    lambda_u: float = 1.0
    """Weight of the consistency loss. 0 is the control: the same stage without it (no pool is read)."""
    rampup_steps: int = 0
    """Sigmoid ramp-up of lambda_u over this many steps (0: constant)."""
    consistency: Literal["ce", "kl"] = "ce"
    ema_alpha: float = 0.999
    ema_warmup: bool = False
    tta: tuple[str, ...] = ("identity", "hflip", "vflip", "bright+", "bright-")
    brightness: float = 0.1
    feature_dropout: float = 0.0
    """UniMatch's feature perturbation: the student also predicts the weak view with this channel dropout on its
    encoder features, against the same pseudo-labels; the two consistency terms are then averaged (0: off)."""

    def __post_init__(self) -> None:
        if not 0 <= self.tau <= 1 or not 0 < self.ema_alpha < 1:
            raise ValueError("tau must be in [0, 1] and ema_alpha in (0, 1)")
        if not 0 <= self.feature_dropout < 1:
            raise ValueError(f"feature_dropout must be in [0, 1), got {self.feature_dropout}")
        if self.lambda_u < 0:
            raise ValueError("lambda_u must be >= 0")


class Targets(NamedTuple):
    """What the student is trained against on one unlabelled batch."""

    strong: torch.Tensor
    """The strong view (CutMix applied when planned)."""
    labels: torch.Tensor
    """Pseudo-labels aligned with ``strong``."""
    keep: torch.Tensor
    """Kept pixels aligned with ``strong``."""
    soft: torch.Tensor | None
    """Teacher probabilities aligned with ``strong`` (KL consistency only)."""
    pseudo: PseudoLabels
    """The teacher's pseudo-labels of the weak view, before mixing (and their statistics)."""
    probs: torch.Tensor
    """The teacher's TTA probabilities of the weak view, before mixing."""


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


class SSLTask(Task):
    """Student in the engine; the EMA teacher beside it pseudo-labels the pool's weak views."""

    def build(self) -> Student:
        parent = parent_matching(self.ctx.parent, self.class_map, "start model")
        student = build_from(parent)
        self.teacher = frozen(copy.deepcopy(student)).to(self.env.device)
        return Student(student, list(student.parameters()), dataclasses.replace(parent.model_cfg, pretrained=None))

    def bind(self, engine, autocast=None) -> None:
        super().bind(engine, autocast)
        self.ema = EMA(self.teacher, self.student, alpha=self.options.ema_alpha,
                       warmup_steps=1000 if self.options.ema_warmup else 0, skip_nonfinite=True)
        self.bn_layers = [m for m in self.student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.thresholds = ClassThresholds(self.class_map.num_classes, self.options.tau, device=self.env.device) \
            if self.options.adaptive_tau else None

    def streams(self) -> tuple[str, ...]:
        """The λ_u = 0 control trains on labels alone, so it neither reads nor pseudo-labels the pool."""
        return super().streams() if self.options.lambda_u > 0 else ("labelled",)

    def step(self, batches: Batches) -> dict[str, torch.Tensor]:
        opts, batch = self.options, labelled(batches)
        if batches.unlabelled is None:
            with self.autocast:
                logits_l = self.engine(batch.image).float()
            sup = supervised_loss(logits_l, batch.mask, self.cfg.loss)
            return {"loss": sup, "sup": sup.detach()}
        t = self.pseudo_targets(batches.unlabelled)
        with self.autocast:
            logits_l = self.engine(batch.image).float()
            with running_stats_frozen(self.bn_layers):
                logits_u = self.engine(t.strong).float()
        sup = supervised_loss(logits_l, batch.mask, self.cfg.loss)
        cons = consistency_loss(logits_u, t.labels, t.keep, kind=opts.consistency, teacher_probs=t.soft)
        out = {"cons": cons.detach()}
        if opts.feature_dropout > 0:
            with self.autocast, running_stats_frozen(self.bn_layers):
                logits_fp = self.engine(batches.unlabelled.image, feature_dropout=opts.feature_dropout).float()
            soft = t.probs if opts.consistency == "kl" else None
            cons_fp = consistency_loss(logits_fp, t.pseudo.labels, t.pseudo.keep, kind=opts.consistency,
                                       teacher_probs=soft)
            cons, out["cons_fp"] = 0.5 * (cons + cons_fp), cons_fp.detach()
        weight = opts.lambda_u * rampup(getattr(self.engine, "global_steps", 0), opts.rampup_steps)
        pl = t.pseudo
        if self.thresholds is not None:
            out["class_tau"] = self.thresholds.thresholds()
        return {"loss": sup + weight * cons, "sup": sup.detach(), **out,
                "kept_fraction": pl.kept_fraction.mean(), "confidence": pl.mean_confidence.mean(),
                "entropy": pl.mean_entropy.mean(), "class_hist": pl.class_hist.float()}

    def pseudo_targets(self, unl: Batch) -> Targets:
        """The strong view and its targets (labels, keep mask, teacher probs for KL) after CutMix, and the teacher's
        own pseudo-labels and probabilities of the weak view before mixing."""
        opts = self.options
        with self.autocast:
            probs = tta_probs(self.teacher, unl.image, opts.tta, opts.brightness)
        tau = opts.tau
        if self.thresholds is not None:
            self.thresholds.update(probs)
            tau = self.thresholds.thresholds()
        pl = pseudo_label(probs, tau=tau, max_entropy=opts.max_entropy, from_logits=False,
                          ignore_index=self.class_map.ignore_index, tile_keep_quantile=opts.tile_keep_quantile)
        labels, keep = pl.labels, pl.keep
        soft = probs if opts.consistency == "kl" else None
        if unl.cutmix_box is not None:
            box, index = unl.cutmix_box, unl.cutmix_index
            labels, keep = apply_cutmix(labels, box, index), apply_cutmix(keep, box, index)
            soft = apply_cutmix(soft, box, index) if soft is not None else None
        return Targets(unl.image_strong, labels, keep, soft, pl, probs)

    def after_step(self, applied: bool) -> None:
        self.ema.update(applied)

    def sync(self) -> None:
        super().sync()
        sync_bn_buffers(self.teacher)

    def replicas(self) -> dict[str, nn.Module]:
        return {"student": self.student, "teacher": self.teacher}

    def evaluate(self, loader) -> dict[str, Any]:
        from distseg.stages.trainer import evaluate_model

        teacher = evaluate_model(self.teacher, loader, self.class_map, self.env, self.autocast)
        student = evaluate_model(self.student, loader, self.class_map, self.env, self.autocast)
        self.teacher.eval()
        return {"score": teacher["miou"] or 0.0, "teacher": teacher, "student": student}

    def export(self, folder: Path) -> None:
        """``model.safetensors`` is the teacher (the model to deploy); the student is kept beside it."""
        folder.mkdir(parents=True, exist_ok=True)
        save_weights(self.teacher, folder / ckpt.WEIGHTS, {"kind": "ssl-teacher"})
        save_weights(self.student, folder / STUDENT_WEIGHTS, {"kind": "ssl-student"})

    def save_extra(self, folder: Path) -> None:
        save_weights(self.teacher, folder / ckpt.TEACHER_WEIGHTS, {"kind": "ema-teacher"})
        torch.save(self.ema.state_dict(), folder / "ema_state.pt")
        if self.thresholds is not None:
            torch.save(self.thresholds.state_dict(), folder / CLASS_TAU_STATE)

    def load_extra(self, folder: Path) -> None:
        state = load_file(str(folder / ckpt.TEACHER_WEIGHTS), device=str(self.env.device))
        self.teacher.load_state_dict(state)
        self.ema.load_state_dict(ckpt.safe_load(folder / "ema_state.pt"))
        if self.thresholds is not None:
            self.thresholds.load_state_dict(ckpt.safe_load(folder / CLASS_TAU_STATE))


KIND = StageKind("ssl", SSLTask, SSLOptions, unlabelled=True, unlabelled_views=("weak", "strong"), script="ssl.py",
                 summary="the mean teacher: EMA teacher pseudo-labels the unlabelled pool for the student")
