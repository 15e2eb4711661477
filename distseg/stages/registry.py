"""The stage kinds: one registered object per kind, and the only list of kinds in distseg.

Each kind lives in one module that defines ``KIND = StageKind(...)``; registering it is one line in
:data:`MODULES`. The launcher, ``python -m distseg.stages``, the recipe planner and its validation, ``distseg bench``
and the CLI help all read this registry, so adding a kind touches nothing else.

Kind modules import torch; :func:`kind_names` does not import them, so command-line help stays instant.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from distseg.lazy import lazy_entry

if TYPE_CHECKING:
    from distseg.stages.task import Task

MODULES: dict[str, str] = {
    "head": "distseg.stages.head",
    "distill": "distseg.stages.distill",
    "ssl": "distseg.stages.ssl",
    "finetune": "distseg.stages.finetune",
    "mim": "distseg.stages.mim",
    "ddpm": "distseg.stages.ddpm",
    "ddpm_head": "distseg.stages.ddpm_head",
    "eval": "distseg.stages.evaluate",
}
"""Kind name -> the module whose ``KIND`` describes it (the registration)."""

EVAL = "eval"
"""The kind that trains nothing and measures its parent on a split: a recipe's results table has one row per
``eval`` stage."""

ParentNeed = Literal["required", "optional", "none"]


@dataclass(frozen=True)
class StageKind:
    """Everything the rest of distseg needs to know about one kind of training stage."""

    name: str
    """The kind's name in recipes, stage.json and ``python -m distseg.stages NAME``."""
    task: type[Task] | None
    """The task class: builds the kind's models and computes its loss dict from the batches it is given (None: the
    kind trains nothing and has its own ``command``)."""
    options: type | None = None
    """Dataclass of the kind's own options; configs spell it as a section named after the kind (``ssl: {...}``)."""
    parent: ParentNeed = "required"
    """Whether the stage starts from a previous stage folder or weights file (``--parent``)."""
    random_start: bool = False
    """With an optional parent: whether it may also start from random weights (no parent, no ``model.pretrained``).
    Kinds that only fine-tune refuse that, since a random start is never what their user meant."""
    labelled: bool = True
    """Reads the labelled train split (and so needs a class map and is validated on the val split)."""
    unlabelled: bool = False
    """Reads an unlabelled pool (``data.unlabeled`` folders, else the data folder's own unlabelled split)."""
    unlabelled_views: tuple[str, ...] = ("weak",)
    """Views of each unlabelled tile the loader produces ('weak', plus 'strong' for consistency training)."""
    changes_classes: bool = False
    """May output another class set than its parent's (only a head-like stage may; others must match)."""
    script: str | None = None
    """``launch/<script>`` for ``deepspeed launch/<script> ...``; every kind also runs as a module."""
    summary: str = ""
    """One line for help texts and docs."""
    command: Any = None
    """The kind's own command line (a Typer app) when it trains nothing; None: the stage command line every training
    kind shares (:mod:`distseg.stages.launcher`)."""

    def __post_init__(self) -> None:
        if not (self.labelled or self.unlabelled):
            raise ValueError(f"stage kind {self.name!r} reads no data: set labelled and/or unlabelled")
        if (self.task is None) == (self.command is None):
            raise ValueError(f"stage kind {self.name!r}: give a task (a training kind) or a command, not both")

    @property
    def trains(self) -> bool:
        """Whether the kind is a training stage (run by the trainer), rather than a command like ``eval``."""
        return self.task is not None

    def check(self, cfg) -> None:
        """Reject a config this kind cannot run, before anything is built (the trainer and the recipe planner both
        call it): an optional parent means "a parent, or ``model.pretrained``" unless the kind may start at random, then the
        task's own checks."""
        from distseg.stages.common import StageError, require_start_model

        if not self.trains:
            raise StageError(f"the {self.name} kind trains nothing; run it as `python -m distseg.stages {self.name}`")
        if self.parent == "optional" and not self.random_start:
            require_start_model(cfg)
        try:
            self.task.check_config(cfg)
        except StageError:
            raise
        except ValueError as exc:  # a task's own check reports bad input the way every stage error is reported
            raise StageError(f"{self.name} stage: {exc}") from None


def kind_names() -> list[str]:
    """Registered kind names, without importing any kind module."""
    return list(MODULES)


def get_kind(name: str) -> StageKind:
    """The registered kind ``name``; an unknown name is an error listing the known ones."""
    return lazy_entry(MODULES, name, "KIND", "stage kind", KeyError)


def all_kinds() -> list[StageKind]:
    """Every registered kind (imports their modules)."""
    return [get_kind(name) for name in MODULES]
