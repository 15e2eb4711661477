"""What a stage kind implements: its models and its loss (``Task``), given a ``StageContext``.

The trainer (:mod:`distseg.stages.trainer`) owns everything else: the DeepSpeed engine around the student, the data
streams the kind declares, the loop, evaluation, checkpoints and the stage folder. A task receives typed batches in
:meth:`Task.step` and returns a loss dict; it never pulls data, so a step can be unit-tested in-process on a CPU
batch::

    kind = get_kind("distill")
    task = kind.task(StageContext(kind, cfg, env, class_map, parent))
    student = task.build()
    task.bind(student.module)            # a plain module stands in for the engine
    losses = task.step(Batches(labelled=batch))
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from distseg.data.batch import Batch, Batches
from distseg.data.classes import ClassMap
from distseg.engine.distributed import DistEnv
from distseg.engine.metrics import evaluate_model
from distseg.engine.state import StageState
from distseg.losses import supervised_loss
from distseg.stages.common import Parent


@dataclass
class StageContext:
    """What a task is built from: the resolved config, this rank's place, the data's classes and the parent."""

    kind: Any
    """The ``StageKind`` being run."""
    cfg: Any
    """The ``StageConfig``; ``cfg.options`` holds the kind's options."""
    env: DistEnv
    class_map: ClassMap | None
    """The labelled data's classes (None for kinds that read no labels)."""
    parent: Parent | None
    """The resolved ``--parent`` (None when none was given)."""
    data: Any = None
    """The stage's data as the trainer opened it (:class:`distseg.stages.data.StageData`: its manifest, read once;
    None in unit tests that build a task by hand)."""


class Student(NamedTuple):
    """What :meth:`Task.build` returns: the module DeepSpeed trains, the parameters it optimises, and the model
    config recorded in stage.json (what a later stage or ``predict`` rebuilds): a config of any registered
    architecture (``distseg.models.architectures``), e.g. ``ModelConfig`` for DeepLabV3+."""

    module: nn.Module
    params: list[nn.Parameter]
    model_cfg: Any


class Task:
    """Base class of a stage kind's task. Subclasses implement :meth:`build` and :meth:`step`; what they hold beside
    the trained module (EMA copies, frozen teachers, stateful objects) they declare on ``self.state``, which the
    loop syncs, checks, saves, resumes and exports (:mod:`distseg.engine.state`)."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx, self.cfg, self.env = ctx, ctx.cfg, ctx.env
        self.options = ctx.cfg.options
        self.class_map = ctx.class_map
        self.state = StageState(ctx.kind.name, ctx.env.device)
        self.engine: Any = None
        self.autocast: Any = contextlib.nullcontext()

    @classmethod
    def check_config(cls, cfg) -> None:
        """Reject a config that cannot work before anything is built (via ``StageKind.check``, which the trainer
        and the recipe planner call)."""

    # -- models --------------------------------------------------------------------------------------------------
    def build(self) -> Student:
        """Build the student and declare any other state on ``self.state``; called once, before the engine exists."""
        raise NotImplementedError

    def bind(self, engine: Any, autocast: Any = None) -> None:
        """Receive the engine wrapping the student (a plain module in unit tests) and the autocast context.

        The declared state pairs its EMA copies with the student here; a kind that needs the student on its device
        for more (an EWC anchor) extends this.
        """
        self.engine = engine
        self.autocast = autocast if autocast is not None else contextlib.nullcontext()
        self.state.bind(self.student)

    @property
    def student(self) -> nn.Module:
        """The trained module itself (the engine's ``module``)."""
        return getattr(self.engine, "module", self.engine)

    # -- training ------------------------------------------------------------------------------------------------
    def streams(self) -> tuple[str, ...]:
        """The streams this run draws, by ``Batches`` field: those the kind declares (a task may read fewer)."""
        return tuple(name for name, wanted in (("labelled", self.ctx.kind.labelled),
                                               ("unlabelled", self.ctx.kind.unlabelled)) if wanted)

    def step(self, batches: Batches) -> dict[str, torch.Tensor]:
        """One micro-step's losses: ``'loss'`` is optimised, every other entry is logged (tensors, no host sync)."""
        raise NotImplementedError

    def supervised(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The student's fp32 logits on a labelled batch (forward under autocast) and the loss dict of L_sup: the
        supervised step every labelled kind takes, alone or as the first term of its own loss."""
        with self.autocast:
            logits = self.engine(batch.image)
        logits = logits.float()
        sup = supervised_loss(logits, batch.mask, self.cfg.loss)
        return logits, {"loss": sup, "sup": sup.detach()}

    # -- evaluation ----------------------------------------------------------------------------------------------
    def evaluate(self, loader) -> dict[str, Any] | None:
        """Validate every replica on ``loader`` (by role); the deployed one's mIoU is ``'score'``, which picks the
        best model. None without a loader (kinds that read no labels), so the last model is exported."""
        if loader is None:
            return None
        results = {role: evaluate_model(module, loader, self.class_map, self.env, self.autocast)
                   for role, module in self.state.evaluated().items()}
        deployed = results[self.state.deployed]["miou"]
        return {"score": deployed if deployed is not None else 0.0, **results}

    def export(self, folder: Path) -> None:
        """Write what a later stage or ``predict`` uses (rank 0 only; no collectives): the declared state's
        weights under their fixed names. A kind that exports something else (an encoder alone) overrides this."""
        self.state.export(folder)

    def finish(self, folder: Path) -> None:
        """Work done once at the very end, after the best weights are in place (rank 0 and others alike)."""

    def record(self) -> dict[str, Any]:
        """Extra stage.json fields of this kind (e.g. the unlabelled pool's size)."""
        return {}


def labelled(batches: Batches) -> Batch:
    """The labelled batch, with its mask (a kind that declares labelled data always gets one)."""
    batch = batches.labelled
    if batch is None or batch.mask is None:
        raise ValueError("this task needs a labelled batch (image and mask)")
    return batch
