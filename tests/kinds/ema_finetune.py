"""An example stage kind that keeps an EMA copy, in one file (used by the tests): fine-tuning that exports an
exponential moving average of the trained weights (the weight averaging timm's ``ModelEmaV3`` keeps).

The kind declares the copy once, on its stage state. Syncing it across ranks, the non-finite and divergence checks,
checkpointing and resuming it, validating it beside the student and exporting it as ``model.safetensors`` (the
trained weights beside it as ``student.safetensors``) all come from the state. Registering the kind is one line,
``MODULES["ema_finetune"] = "ema_finetune"``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distseg.data.batch import Batches
from distseg.engine.state import EMAOptions
from distseg.stages.common import start_model
from distseg.stages.registry import StageKind
from distseg.stages.task import Student, Task, labelled


@dataclass
class EMAFinetuneOptions:
    """The exported copy's averaging."""

    ema: EMAOptions = field(default_factory=lambda: EMAOptions(alpha=0.9))
    """An EMA of the trained weights, exported as the stage's model."""


class EMAFinetuneTask(Task):
    """The whole model trains with the supervised loss; its EMA copy is what the stage deploys."""

    def build(self) -> Student:
        model, model_cfg = start_model(self.ctx.parent, self.cfg, self.class_map.num_classes)
        self.state.ema("ema", model, self.options.ema, deploy=True)
        return Student(model, list(model.parameters()), model_cfg)

    def step(self, batches: Batches) -> dict[str, torch.Tensor]:
        return self.supervised(labelled(batches))[1]


KIND = StageKind("ema_finetune", EMAFinetuneTask, EMAFinetuneOptions, parent="optional", changes_classes=True,
                 summary="fine-tuning that exports an EMA of its weights")
