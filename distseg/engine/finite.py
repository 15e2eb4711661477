"""Non-finite safety: an optimizer step with a NaN/inf loss or gradient is skipped on every rank together.

The check lives in the client optimizer's ``step`` because that is the one place that sees the gradients it is
about to apply on every DeepSpeed path: the whole averaged gradients under ZeRO-0, this rank's flat partition under
ZeRO-1/2. Its cost per optimizer step is one fused norm over those gradients, one all-reduce of a single number
and one host read of it (the only host sync it adds; ZeRO-1/2 already skip a step whose gradient norm is not
finite on their own, and fp16 loss scaling skips overflowed steps before the client optimizer is reached).
A skipped step sets the optimizer's ``overflow`` flag, which DeepSpeed's ZeRO-0 engine reads like an fp16
overflow: ``was_step_applied()`` is False and the learning-rate schedule does not advance.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distseg.errors import UserError
from distseg.ops.finite import all_finite


class NonFiniteError(UserError, ValueError):
    """Training diverged: too many non-finite steps in a row, or weights with NaN/inf where a result is due."""


def module_tensors(module: nn.Module) -> list[Tensor]:
    """Parameters and buffers of a module (what an export writes)."""
    return [*module.parameters(), *module.buffers()]


def nonfinite_modules(modules: dict[str, nn.Module]) -> list[str]:
    """Names of the modules holding a NaN or ±inf anywhere, checked element-wise (one host sync per module: for
    evaluations and exports, not for the training step)."""
    bad = []
    for name, module in modules.items():
        flags = [t.detach().isfinite().all() for t in module_tensors(module) if t.is_floating_point()]
        if flags and not bool(torch.stack(flags).all()):
            bad.append(name)
    return bad


class StepGuard:
    """Decides, once per optimizer step and identically on every rank, whether the update may be applied.

    A skipped step must change nothing, but its forward passes already moved the student's BatchNorm running
    statistics (towards NaN, typically): :meth:`keep_buffers` makes the guard copy the student's buffers before each
    step (:meth:`begin`, one fused device copy of a few thousand numbers) and put them back when the step is not
    applied.
    """

    def __init__(self) -> None:
        self._bad_loss: Tensor | None = None
        self.vetoed = False
        """Whether the latest optimizer step was skipped by this guard."""
        self._buffers: list[Tensor] = []
        self._saved: list[Tensor] = []

    def keep_buffers(self, module: nn.Module) -> None:
        """Restore ``module``'s buffers after every skipped step."""
        self._buffers = [b for b in module.buffers() if b.numel()]
        self._saved = [torch.empty_like(b) for b in self._buffers]

    def begin(self) -> None:
        """Start an optimizer step: remember the buffers (device copy, no host sync)."""
        if self._buffers:
            torch._foreach_copy_(self._saved, self._buffers)

    def watch(self, loss: Tensor) -> None:
        """Note a micro-step's loss (device-side: no host sync)."""
        bad = ~loss.detach().isfinite().all()
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad

    def allow(self, grads: list[Tensor]) -> bool:
        """Collective: True when the watched losses and every rank's ``grads`` are finite."""
        bad = ~all_finite(grads)
        if self._bad_loss is not None:
            bad = bad | self._bad_loss.to(bad.device)
        flag = bad.to(torch.float32).reshape(1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl" and flag.device.type != "cuda":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._bad_loss = None
        self.vetoed = bool(flag.item())
        return not self.vetoed

    def applied(self, engine) -> bool:
        """Whether the step just taken changed the weights (DeepSpeed's own skips included); a skipped step gets
        its buffers back. Resets the veto."""
        applied = bool(engine.was_step_applied()) and not self.vetoed
        self.vetoed, self._bad_loss = False, None
        if not applied and self._buffers:
            torch._foreach_copy_(self._buffers, self._saved)
        return applied


@functools.cache
def guarded(optimizer_cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``optimizer_cls`` whose ``step`` asks a :class:`StepGuard` (its ``guard`` attribute) first."""

    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        guard = getattr(self, "guard", None)
        self.overflow = guard is not None and not guard.allow(grads)
        if self.overflow:
            return None
        return optimizer_cls.step(self, closure)

    return type(f"Guarded{optimizer_cls.__name__}", (optimizer_cls,), {"step": step, "__doc__": optimizer_cls.__doc__})
