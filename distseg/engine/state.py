"""A stage's named state: the modules a task declares by role, and the one place that handles them.

A task declares what it holds, once, while it builds its models::

    self.teacher = self.state.ema("teacher", student, self.options.ema, deploy=True)   # a mean teacher
    self.thresholds = self.state.stateful("class_tau", ClassThresholds(...))          # any state_dict() object
    self.teacher = self.state.frozen("teacher", build_from(parent))                   # a distillation teacher

The trained module is the engine's; :meth:`StageState.bind` receives it once the engine exists. From then on the
loop and the stage's finish ask this object, never the task, to

- make BatchNorm buffers identical across ranks (:meth:`sync`), before an evaluation or a checkpoint;
- name the modules every rank holds a copy of (:meth:`replicas`), for the non-finite and rank-divergence checks;
- follow the trained module after each applied optimizer step (:meth:`after_step`, the EMA copies);
- save and restore what DeepSpeed does not own (:meth:`save`, :meth:`load`: EMA weights, EMA counters, objects);
- export the stage's weights under their fixed names (:meth:`export`).

Frozen modules are rebuilt from the parent by every run, so they are neither saved nor checked.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from distseg.engine import checkpoint as ckpt
from distseg.engine.distributed import sync_bn_buffers
from distseg.models.weights import save_weights
from distseg.ops.ema import EMA

TRAINED = "student"
"""The trained module's role name (the engine's module): in replicas, metrics and ``student.safetensors``."""
STUDENT_WEIGHTS = "student.safetensors"
"""Where the trained module is exported when the deployed model is another role (an EMA copy)."""
STATE_FILE = "task_state.pt"
"""The checkpoint tag's file of small state: EMA update counters and the declared objects' state dicts."""


@dataclass
class EMAOptions:
    """An exponential moving average of the trained weights: W ← α·W + (1 − α)·W_trained per applied step."""

    alpha: float = 0.999
    """Decay α per applied optimizer step (closer to 1: a slower, smoother copy)."""
    warmup_steps: int = 0
    """Decay min(α, (1+n)/(10+n)) for the first this many applied updates, so a copy that starts from a poor model
    does not hold on to it for thousands of steps (0: α from the start)."""

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"ema.alpha must be in (0, 1), got {self.alpha}")
        if self.warmup_steps < 0:
            raise ValueError(f"ema.warmup_steps must be >= 0, got {self.warmup_steps}")


class Stateful(Protocol):
    """An object whose state a checkpoint carries (e.g. :class:`distseg.ops.thresholds.ClassThresholds`)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def freeze(model: nn.Module) -> nn.Module:
    """No gradients, eval mode (BatchNorm uses running statistics, dropout off)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class StageState:
    """The modules of one stage by role, and the objects its checkpoints carry (see module docstring)."""

    def __init__(self, kind: str, device: torch.device | str = "cpu") -> None:
        self.kind, self.device = kind, torch.device(device)
        self.trained: nn.Module | None = None
        self._ema: dict[str, tuple[nn.Module, EMAOptions]] = {}
        self._frozen: dict[str, nn.Module] = {}
        self._objects: dict[str, Stateful] = {}
        self._updaters: dict[str, EMA] = {}
        self.deployed = TRAINED
        """The role exported as ``model.safetensors``: what a later stage, ``evaluate`` and ``predict`` read."""

    # -- declarations (while the task builds) --------------------------------------------------------------------
    def ema(self, name: str, of: nn.Module, options: EMAOptions, *, deploy: bool = False) -> nn.Module:
        """An EMA copy of ``of`` (the module about to be trained), frozen, on the device; with ``deploy`` it is the
        stage's exported model and the model it is validated and selected by."""
        self._declare(name)
        module = freeze(copy.deepcopy(of)).to(self.device)
        self._ema[name] = (module, options)
        if deploy:
            self.deployed = name
        return module

    def frozen(self, name: str, module: nn.Module) -> nn.Module:
        """A fixed module beside the engine (a distillation teacher), frozen, on the device."""
        self._declare(name)
        self._frozen[name] = freeze(module).to(self.device)
        return self._frozen[name]

    def stateful(self, name: str, obj: Stateful) -> Stateful:
        """Any object with ``state_dict``/``load_state_dict`` whose state checkpoints carry and a resume restores."""
        self._declare(name)
        self._objects[name] = obj
        return obj

    def _declare(self, name: str) -> None:
        taken = {TRAINED, *self._ema, *self._frozen, *self._objects}
        if name in taken:
            raise ValueError(f"stage state: the name {name!r} is already declared ({sorted(taken)})")

    def bind(self, trained: nn.Module) -> None:
        """Receive the trained module (the engine's, on its device) and pair every EMA copy with it."""
        self.trained = trained
        self._updaters = {name: EMA(module, trained, alpha=opts.alpha, warmup_steps=opts.warmup_steps,
                                    skip_nonfinite=True)
                          for name, (module, opts) in self._ema.items()}

    # -- what the loop asks --------------------------------------------------------------------------------------
    def module(self, role: str) -> nn.Module:
        """The module declared as ``role`` (or the trained one)."""
        if role == TRAINED:
            return self.trained
        return self._ema[role][0] if role in self._ema else self._frozen[role]

    @property
    def deployed_module(self) -> nn.Module:
        """The module exported as ``model.safetensors``."""
        return self.module(self.deployed)

    def replicas(self) -> dict[str, nn.Module]:
        """The modules every rank holds a copy of and updates: the trained one and the EMA copies."""
        return {TRAINED: self.trained, **{name: module for name, (module, _) in self._ema.items()}}

    def beside_engine(self) -> list[nn.Module]:
        """The modules outside the engine (EMA copies and frozen ones): they run on the student's activation
        layout and autocast too."""
        return [module for module, _ in self._ema.values()] + list(self._frozen.values())

    def evaluated(self) -> dict[str, nn.Module]:
        """The modules validation reports, the deployed one first (its score selects the best checkpoint)."""
        replicas = self.replicas()
        return {self.deployed: replicas[self.deployed], **replicas}

    def sync(self) -> None:
        """Collective: BatchNorm buffers of every replica made identical across ranks."""
        for module in self.replicas().values():
            sync_bn_buffers(module)

    def after_step(self, applied: bool) -> None:
        """Once per optimizer step: the EMA copies follow the trained module, unless the step was skipped."""
        for updater in self._updaters.values():
            updater.update(applied)

    # -- files ---------------------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Into a checkpoint tag folder (rank 0): each EMA copy's weights, and one file of small state."""
        for name, (module, _) in self._ema.items():
            save_weights(module, folder / f"{name}.safetensors", {"kind": f"{self.kind}-{name}"})
        small = {"ema": {name: u.state_dict() for name, u in self._updaters.items()},
                 "objects": {name: obj.state_dict() for name, obj in self._objects.items()}}
        if self._ema or self._objects:
            torch.save(small, folder / STATE_FILE)

    def load(self, folder: Path) -> None:
        """Restore what :meth:`save` wrote (every rank)."""
        from safetensors.torch import load_file

        for name, (module, _) in self._ema.items():
            module.load_state_dict(load_file(str(folder / f"{name}.safetensors"), device=str(self.device)))
        if not (self._ema or self._objects):
            return
        small = ckpt.safe_load(folder / STATE_FILE, map_location=self.device)
        for name, updater in self._updaters.items():
            updater.load_state_dict(small["ema"][name])
        for name, obj in self._objects.items():
            obj.load_state_dict(small["objects"][name])

    def export(self, folder: Path) -> None:
        """``model.safetensors`` is the deployed module; when that is an EMA copy, the trained one is kept beside it
        as ``student.safetensors`` (rank 0; no collectives)."""
        folder.mkdir(parents=True, exist_ok=True)
        save_weights(self.deployed_module, folder / ckpt.WEIGHTS, {"kind": self.kind, "role": self.deployed})
        if self.deployed != TRAINED:
            save_weights(self.trained, folder / STUDENT_WEIGHTS, {"kind": self.kind, "role": TRAINED})
