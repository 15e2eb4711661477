"""Stage A: a hop's teacher, made by training a new classifier (optionally the head) on the hop's labels."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from distseg.losses import supervised_loss
from distseg.stages.base import StageBase, run_stage
from distseg.stages.common import StageError, build_from, resolve_parent


class HeadStage(StageBase):
    kind = "head"

    def build_models(self) -> tuple[nn.Module, list[nn.Parameter]]:
        parent = resolve_parent(self.cfg.parent, self.cfg.model)
        if parent.weights is None and self.cfg.model.pretrained is None:
            raise StageError("a head stage needs a parent (stage folder or weights) or model.pretrained "
                             "('imagenet' or a PATH): fine-tuning only the head of a random network is meaningless")
        model = build_from(parent, num_classes=self.class_map.num_classes, pretrained=self.cfg.model.pretrained)
        self.model_cfg = dataclasses.replace(parent.model_cfg, pretrained=None,
                                             num_classes=self.class_map.num_classes)
        groups = model.parameter_groups()
        trainable = groups["classifier"] + (groups["head"] if self.cfg.head.train_head else [])
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        self._frozen_modules = [model.backbone] if self.cfg.head.train_head else [
            m for name, m in model.named_children() if name != "classifier"]
        return model, trainable

    def forward(self) -> dict[str, torch.Tensor]:
        # Frozen parts stay in eval mode: their BN statistics must not drift while their weights are fixed.
        for module in self._frozen_modules:
            module.eval()
        images, masks = self.next_labelled()
        with self.autocast:
            logits = self.engine(images)
        sup = supervised_loss(logits.float(), masks, self.cfg.loss)
        return {"loss": sup, "sup": sup.detach()}


def run(cfg, **kwargs):
    """Run a head fine-tune stage (see :func:`distseg.stages.base.run_stage`)."""
    return run_stage(HeadStage, cfg, **kwargs)
