"""Plain supervised fine-tuning: every weight trains on the labels with L_sup (the baseline a user would run).

It starts from ``model.pretrained`` (ImageNet) with a fresh head, or from any parent stage or weights file; a parent
that predicts another class set gets a fresh classifier for the data's classes.
"""
from __future__ import annotations

import dataclasses

import torch

from distseg.data.batch import Batches
from distseg.losses import supervised_loss
from distseg.stages.common import Parent, StageError, build_from
from distseg.stages.registry import StageKind
from distseg.stages.task import Student, Task, labelled


class FinetuneTask(Task):
    """The whole model trains with the supervised loss."""

    @classmethod
    def check_config(cls, cfg) -> None:
        if not cfg.parent and cfg.model.pretrained is None:
            raise StageError("a finetune stage needs a parent (stage folder or weights) or model.pretrained "
                             "('imagenet' or a PATH); to train from scratch, say so with a random-init weights file")

    def build(self) -> Student:
        parent = self.ctx.parent or Parent(model_cfg=self.cfg.model, weights=None, class_map=None)
        n = self.class_map.num_classes
        model = build_from(parent, num_classes=n, pretrained=self.cfg.model.pretrained)
        return Student(model, list(model.parameters()),
                       dataclasses.replace(parent.model_cfg, pretrained=None, num_classes=n))

    def step(self, batches: Batches) -> dict[str, torch.Tensor]:
        batch = labelled(batches)
        with self.autocast:
            logits = self.engine(batch.image)
        sup = supervised_loss(logits.float(), batch.mask, self.cfg.loss)
        return {"loss": sup, "sup": sup.detach()}


KIND = StageKind("finetune", FinetuneTask, parent="optional", changes_classes=True, script="finetune.py",
                 summary="plain fine-tuning of the whole model on the labels (from ImageNet or any parent)")
