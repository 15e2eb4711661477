"""Stage B: distil a student from a frozen teacher with L_sup + α·L_KD + λ·L_EWC."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from distseg.data.batch import Batches
from distseg.losses import EWC, kd_loss
from distseg.stages.common import build_from, parent_matching
from distseg.fisher import load_fisher
from distseg.stages.registry import StageKind
from distseg.stages.task import Student, Task, labelled


@dataclass
class DistillOptions:
    """Stage B: L = L_sup + alpha·L_KD + lambda·L_EWC against a frozen teacher."""

    alpha: float = 1.0
    """Weight α of the KD term (0: no teacher forward, plain supervised training with EWC)."""
    temperature: float = 3.0
    """KD temperature T: both logits are divided by T and the KL term is scaled by T² (the study uses 3)."""
    ewc_lambda: float = 1.0
    """EWC weight (the study gives none); needs fisher.safetensors in the teacher's folder, else EWC is off."""
    init_from_teacher: bool = False
    """Start the student from the teacher's weights instead of a fresh (ImageNet/random) backbone."""

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.ewc_lambda < 0 or self.temperature <= 0:
            raise ValueError("alpha and ewc_lambda must be >= 0 and temperature > 0")


class DistillTask(Task):
    """A student of the teacher's architecture; the teacher is a frozen plain module beside the engine."""

    def build(self) -> Student:
        parent = parent_matching(self.ctx.parent, self.class_map, "teacher")
        self.teacher = self.state.frozen("teacher", build_from(parent))
        if self.options.init_from_teacher:
            student = build_from(parent)
        else:
            student = build_from(dataclasses.replace(parent, weights=None), pretrained=self.cfg.model.pretrained)
        self.parent = parent
        return Student(student, list(student.parameters()), dataclasses.replace(parent.model_cfg, pretrained=None))

    def bind(self, engine, autocast=None) -> None:
        super().bind(engine, autocast)
        self.ewc = self._ewc()

    def _ewc(self) -> EWC | None:
        """EWC anchored at the teacher's weights, with the Fisher its stage saved; off when λ=0 or no Fisher."""
        if self.options.ewc_lambda == 0:
            return None
        if self.parent.fisher is None:
            if self.env.is_main:
                print(f"warning: {self.cfg.parent} has no fisher.safetensors; EWC is off for this stage")
            return None
        state = load_fisher(self.parent.fisher)
        anchor = {n: p.detach().to(self.env.device) for n, p in self.teacher.named_parameters()}
        fisher = {n: f.to(self.env.device) for n, f in state.fisher.items()}
        return EWC(anchor, fisher, self.options.ewc_lambda).bind(self.student)

    def step(self, batches: Batches) -> dict[str, torch.Tensor]:
        batch, opts = labelled(batches), self.options
        logits, out = self.supervised(batch)
        loss = out.pop("loss")
        if opts.alpha > 0:  # with alpha = 0 this is plain supervised training: no teacher forward at all
            with torch.no_grad(), self.autocast:
                teacher_logits = self.teacher(batch.image)
            kd = kd_loss(logits, teacher_logits.float(), T=opts.temperature)
            loss = loss + opts.alpha * kd
            out["kd"] = kd.detach()
        if self.ewc is not None:
            ewc = self.ewc.penalty()
            loss = loss + ewc
            out["ewc"] = ewc.detach()
        return {"loss": loss, **out}


KIND = StageKind("distill", DistillTask, DistillOptions, script="distill.py",
                 summary="a student distilled from a frozen teacher: L_sup + alpha L_KD + lambda L_EWC")
