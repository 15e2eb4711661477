"""An example stage kind in one file (used by the tests): a linear probe.

The classifier alone trains, on a model that stays frozen and in eval mode, so the probe's score says how much the
parent's features already separate the classes. Registering it is one line, ``MODULES["linear_probe"] =
"linear_probe"``; the launcher, recipes, ``distseg bench`` and the help texts then know it.
"""
from __future__ import annotations

import torch

from distseg.data.batch import Batches
from distseg.stages.common import start_model
from distseg.stages.registry import StageKind
from distseg.stages.task import Student, Task, labelled


class LinearProbeTask(Task):
    """A fresh classifier for the data's classes; every other weight and statistic stays as the parent left it."""

    def build(self) -> Student:
        model, model_cfg = start_model(self.ctx.parent, self.cfg, self.class_map.num_classes)
        model.requires_grad_(False)
        classifier = model.parameter_groups()["classifier"]
        for p in classifier:
            p.requires_grad_(True)
        self._frozen = [m for name, m in model.named_children() if name != "classifier"]
        return Student(model, classifier, model_cfg)

    def step(self, batches: Batches) -> dict[str, torch.Tensor]:
        for module in self._frozen:  # frozen BN keeps its statistics
            module.eval()
        return self.supervised(labelled(batches))[1]


KIND = StageKind("linear_probe", LinearProbeTask, parent="required", changes_classes=True,
                 summary="a linear probe: the classifier alone on a frozen parent")
