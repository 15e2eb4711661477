"""Stage A: a hop's teacher, made by training a new classifier (optionally the head) on the hop's labels."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from distseg.data.batch import Batches
from distseg.stages.common import start_model
from distseg.stages.registry import StageKind
from distseg.stages.task import Student, Task, labelled


@dataclass
class HeadOptions:
    """Stage A: fine-tune a new classifier on this hop's labels to make the hop's teacher."""

    train_head: bool = False
    """Also train ASPP/decoder/PSA, not only the classifier."""


class HeadTask(Task):
    """A new classifier for the data's classes on a frozen model; the backbone stays in eval mode."""

    def build(self) -> Student:
        model, model_cfg = start_model(self.ctx.parent, self.cfg, self.class_map.num_classes)
        groups = model.parameter_groups()
        trainable = groups["classifier"] + (groups["head"] if self.options.train_head else [])
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        self._frozen = [model.backbone] if self.options.train_head else [
            m for name, m in model.named_children() if name != "classifier"]
        return Student(model, trainable, model_cfg)

    def step(self, batches: Batches) -> dict[str, torch.Tensor]:
        # Frozen parts stay in eval mode: their BN statistics must not drift while their weights are fixed.
        for module in self._frozen:
            module.eval()
        return self.supervised(labelled(batches))[1]


KIND = StageKind("head", HeadTask, HeadOptions, parent="optional", changes_classes=True,
                 script="finetune_head.py",
                 summary="a hop's teacher: a new classifier for this hop's classes on a frozen model")
