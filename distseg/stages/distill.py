"""Stage B: distil a student from a frozen teacher with L_sup + α·L_KD + λ·L_EWC."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from distseg.losses import EWC, kd_loss, load_fisher, supervised_loss
from distseg.stages.base import StageBase, run_stage
from distseg.stages.common import build_from, frozen, parent_matching


class DistillStage(StageBase):
    kind = "distill"

    def build_models(self) -> tuple[nn.Module, list[nn.Parameter]]:
        parent = parent_matching(self.cfg.parent, self.cfg.model, self.class_map, "teacher")
        self.teacher = frozen(build_from(parent)).to(self.env.device)
        opts = self.cfg.distill
        if opts.init_from_teacher:
            student = build_from(parent)
        else:
            student = build_from(dataclasses.replace(parent, weights=None), pretrained=self.cfg.model.pretrained)
        self.model_cfg = dataclasses.replace(parent.model_cfg, pretrained=None)
        self.ewc = self._ewc(parent, student)
        return student, list(student.parameters())

    def _ewc(self, parent, student: nn.Module) -> EWC | None:
        """EWC anchored at the teacher's weights, with the Fisher its stage saved; off when λ=0 or no Fisher."""
        if self.cfg.distill.ewc_lambda == 0:
            return None
        if parent.fisher is None:
            if self.env.is_main:
                print(f"warning: {self.cfg.parent} has no fisher.safetensors; EWC is off for this stage")
            return None
        state = load_fisher(parent.fisher)
        anchor = {n: p.detach().to(self.env.device) for n, p in self.teacher.named_parameters()}
        fisher = {n: f.to(self.env.device) for n, f in state.fisher.items()}
        return EWC(anchor, fisher, self.cfg.distill.ewc_lambda).bind(student)

    def forward(self) -> dict[str, torch.Tensor]:
        images, masks = self.next_labelled()
        opts = self.cfg.distill
        with self.autocast:
            logits = self.engine(images)
        logits = logits.float()
        sup = supervised_loss(logits, masks, self.cfg.loss)
        loss, out = sup, {"sup": sup.detach()}
        if opts.alpha > 0:  # with alpha = 0 this is plain supervised training: no teacher forward at all
            with torch.no_grad(), self.autocast:
                teacher_logits = self.teacher(images)
            kd = kd_loss(logits, teacher_logits.float(), T=opts.temperature)
            loss = loss + opts.alpha * kd
            out["kd"] = kd.detach()
        if self.ewc is not None:
            ewc = self.ewc.penalty()
            loss = loss + ewc
            out["ewc"] = ewc.detach()
        return {"loss": loss, **out}


def run(cfg, **kwargs):
    """Run a distillation stage (see :func:`distseg.stages.base.run_stage`)."""
    return run_stage(DistillStage, cfg, **kwargs)
