"""Plain supervised fine-tuning: every weight trains on the labels with L_sup (the baseline a user would run).

It starts from ``model.pretrained`` (ImageNet) with a fresh head, or from any parent stage or weights file; a parent
that predicts another class set gets a fresh classifier for the data's classes.
"""
from __future__ import annotations

import torch

from distseg.data.batch import Batches
from distseg.stages.common import start_model
from distseg.stages.registry import StageKind
from distseg.stages.task import Student, Task, labelled


class FinetuneTask(Task):
    """The whole model trains with the supervised loss."""

    def build(self) -> Student:
        model, model_cfg = start_model(self.ctx.parent, self.cfg, self.class_map.num_classes)
        return Student(model, list(model.parameters()), model_cfg)

    def step(self, batches: Batches) -> dict[str, torch.Tensor]:
        return self.supervised(labelled(batches))[1]


KIND = StageKind("finetune", FinetuneTask, parent="optional", changes_classes=True, script="finetune.py",
                 summary="plain fine-tuning of the whole model on the labels (from ImageNet or any parent)")
