"""Exponential moving average of a student into a mean teacher, with fused foreach kernels.

W_T ← α·W_T + (1−α)·W_S over parameters *and* buffers (BN running statistics), as
``torch._foreach_lerp_(teacher, student, 1 − α)``: one fused read-read-write pass per (device,
dtype) group instead of a Python loop issuing two kernels per tensor. Integer buffers
(``num_batches_tracked``) are copied. :class:`EMA` pairs and groups the tensors once, so an update
is a handful of foreach calls whatever the model's size.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from distseg.ops.finite import all_finite


def _paired_tensors(teacher: nn.Module, student: nn.Module) -> list[tuple[str, Tensor, Tensor]]:
    """(name, teacher tensor, student tensor) over parameters and buffers, checked name by name."""
    t_named = {**dict(teacher.named_parameters()), **dict(teacher.named_buffers())}
    s_named = {**dict(student.named_parameters()), **dict(student.named_buffers())}
    if t_named.keys() != s_named.keys():
        diff = sorted(t_named.keys() ^ s_named.keys())
        raise ValueError(f"teacher and student differ in tensor names: {diff[:8]}")
    pairs = []
    for name, t in t_named.items():
        s = s_named[name]
        if t.shape != s.shape or t.device != s.device:
            raise ValueError(f"{name}: teacher {tuple(t.shape)}@{t.device} vs student {tuple(s.shape)}@{s.device}")
        if t.is_floating_point() != s.is_floating_point():
            raise ValueError(f"{name}: teacher {t.dtype} vs student {s.dtype}")
        pairs.append((name, t.detach(), s.detach()))
    return pairs


@dataclass
class _Group:
    """Teacher/student tensors sharing (device, teacher dtype, student dtype).

    When the student's dtype differs (a half-precision engine module against an fp32 teacher), its
    values are first converted into the fp32 ``scratch`` tensors by one foreach copy.
    """

    teacher: list[Tensor]
    student: list[Tensor]
    scratch: list[Tensor] = field(default_factory=list)

    def source(self) -> list[Tensor]:
        """The student values in the teacher's dtype."""
        if not self.scratch:
            return self.student
        torch._foreach_copy_(self.scratch, self.student)
        return self.scratch


def _group(pairs: list[tuple[str, Tensor, Tensor]], floating: bool) -> list[_Group]:
    """Bucket float (or integer) pairs by (device, dtypes); build conversion scratch where dtypes differ."""
    buckets: dict[tuple, _Group] = {}
    for _, t, s in pairs:
        if t.is_floating_point() != floating:
            continue
        g = buckets.setdefault((t.device, t.dtype, s.dtype), _Group([], []))
        g.teacher.append(t)
        g.student.append(s)
    for (_, t_dtype, s_dtype), g in buckets.items():
        if t_dtype != s_dtype:
            g.scratch = [torch.empty_like(t) for t in g.teacher]
    return list(buckets.values())


def ema_update_(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """One EMA step W_T ← α·W_T + (1−α)·W_S over parameters and float buffers; integer buffers are copied.

    Pairs the tensors on every call; a training loop should hold an :class:`EMA` instead.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"EMA alpha must be in [0, 1], got {alpha}")
    pairs = _paired_tensors(teacher, student)
    with torch.no_grad():
        for g in _group(pairs, floating=True):
            torch._foreach_lerp_(g.teacher, g.source(), 1.0 - float(alpha))
        for g in _group(pairs, floating=False):
            torch._foreach_copy_(g.teacher, g.student)


def ema_update_reference_(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """Naive per-tensor loop of the literal formula α·W_T + (1−α)·W_S (tests and benchmark only)."""
    with torch.no_grad():
        for _, t, s in _paired_tensors(teacher, student):
            if t.is_floating_point():
                t.mul_(alpha).add_(s.to(t.dtype), alpha=1.0 - alpha)
            else:
                t.copy_(s)


class EMA:
    """Mean-teacher EMA bound to one (teacher, student) pair.

    The teacher is frozen (``requires_grad=False``) and put in eval mode. ``update()`` runs after
    each optimizer step and is skipped when that step was not applied (fp16 overflow).

    Warm-up (``warmup_steps > 0``): for the first ``warmup_steps`` applied updates the decay is
    α_eff = min(α, (1+n)/(10+n)), n = updates so far (the TensorFlow ``num_updates`` rule), so a
    teacher starting from a poor student does not hold on to its first weights for thousands of
    steps; afterwards α_eff = α. Without warm-up, and with a plain ``bool`` flag, the update uses
    the scalar ``_foreach_lerp_`` fast path. With warm-up or a tensor flag (e.g. an on-device
    "step applied" from a GradScaler), the weight 1−α_eff is computed on the device, so the
    update never syncs with the host.

    ``skip_nonfinite``: an update whose student holds a NaN or ±inf is skipped, so the teacher never averages a
    diverged student. The test is one fused norm over the student and one host read of its flag per update: a
    lerp by 0 is not a no-op against a NaN (0·NaN = NaN), so a device-side flag cannot protect the teacher.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, alpha: float = 0.999, warmup_steps: int = 0,
                 skip_nonfinite: bool = False) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"EMA alpha must be in [0, 1], got {alpha}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.teacher, self.alpha, self.warmup_steps = teacher, float(alpha), int(warmup_steps)
        self.skip_nonfinite = skip_nonfinite
        teacher.requires_grad_(False)
        teacher.eval()
        pairs = _paired_tensors(teacher, student)
        self._float = _group(pairs, floating=True)
        self._int = _group(pairs, floating=False)
        device = pairs[0][1].device if pairs else torch.device("cpu")
        self._count = torch.zeros((), dtype=torch.float64, device=device)
        self._weights = [torch.zeros((), dtype=g.teacher[0].dtype, device=g.teacher[0].device) for g in self._float]
        self._weight_lists = [[w] * len(g.teacher) for w, g in zip(self._weights, self._float)]

    @property
    def num_updates(self) -> int:
        """Applied updates so far (reads the device counter: not for the hot path)."""
        return int(self._count.item())

    def state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint needs to resume the schedule (the teacher weights are saved separately)."""
        return {"num_updates": self._count.detach().cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore the update counter saved by :meth:`state_dict`."""
        self._count.copy_(state["num_updates"])

    @torch.no_grad()
    def update(self, step_applied: bool | Tensor = True) -> None:
        """Blend the student into the teacher, unless the optimizer step was not applied."""
        if isinstance(step_applied, bool) and not step_applied:
            return
        if self.skip_nonfinite and not self.student_finite():
            return
        if isinstance(step_applied, bool):
            if self.warmup_steps == 0:
                self._lerp_scalar(1.0 - self.alpha)
                self._count += 1
                return
            step_applied = torch.ones((), dtype=torch.bool, device=self._count.device)
        self._lerp_tensor(step_applied.to(device=self._count.device, dtype=torch.bool))

    def student_finite(self) -> bool:
        """Whether the student holds no NaN or ±inf (one fused norm and one host read)."""
        return bool(all_finite([t for g in self._float for t in g.student]))

    def _lerp_scalar(self, weight: float) -> None:
        """Fast path: constant weight, applied step."""
        for g in self._float:
            torch._foreach_lerp_(g.teacher, g.source(), weight)
        for g in self._int:
            torch._foreach_copy_(g.teacher, g.student)

    def _alpha_eff(self) -> Tensor:
        """α, or the warm-up α_eff, as a device scalar."""
        n = self._count
        if self.warmup_steps == 0:
            return torch.full_like(n, self.alpha)
        ramp = torch.clamp((1.0 + n) / (10.0 + n), max=self.alpha)
        return torch.where(n < self.warmup_steps, ramp, torch.full_like(n, self.alpha))

    def _lerp_tensor(self, applied: Tensor) -> None:
        """Device path: weight (1 − α_eff)·applied, so a skipped step is a lerp by 0 (exact no-op)."""
        weight = (1.0 - self._alpha_eff()) * applied
        for g, w, w_list in zip(self._float, self._weights, self._weight_lists):
            w.copy_(weight)
            torch._foreach_lerp_(g.teacher, g.source(), w_list)
        for g in self._int:
            delta = torch._foreach_sub(g.student, g.teacher)
            torch._foreach_mul_(delta, applied.to(g.teacher[0].dtype))
            torch._foreach_add_(g.teacher, delta)
        self._count += applied.to(self._count.dtype)
