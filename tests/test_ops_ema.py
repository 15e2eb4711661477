"""Fused EMA against the literal per-tensor formula, over parameters and buffers."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from distseg.ops.ema import EMA, ema_update_, ema_update_reference_


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))


def _train_step(student: nn.Module, gen: torch.Generator) -> None:
    """Move the parameters and the BN buffers (running stats, num_batches_tracked) of the student."""
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        student.train()
        student(torch.randn(2, 3, 6, 6, generator=gen))


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _assert_states_close(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if sa[k].is_floating_point():
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(sa[k], sb[k]), k


def _formula(teacher: dict, student: dict, alpha: float) -> dict:
    """W_T <- a*W_T + (1-a)*W_S in float64; integer buffers copied."""
    return {
        k: (alpha * v.double() + (1 - alpha) * student[k].double()).to(v.dtype) if v.is_floating_point() else student[k]
        for k, v in teacher.items()
    }


@pytest.mark.parametrize("flag_kind", ["bool", "tensor"])
def test_ema_matches_formula_over_many_steps_with_skips(flag_kind):
    student = _net()
    teacher = copy.deepcopy(student)
    ema = EMA(teacher, student, alpha=0.9)
    expected = _state(teacher)
    gen = torch.Generator().manual_seed(1)
    for step in range(40):
        _train_step(student, gen)
        applied = step % 4 != 3
        ema.update(applied if flag_kind == "bool" else torch.tensor(applied))
        if applied:
            expected = _formula(expected, _state(student), 0.9)
    for k, v in teacher.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(v, expected[k]), k
    assert ema.num_updates == 30
    assert teacher[1].num_batches_tracked.item() == 39  # the last skipped step left the older count


def test_skipped_step_leaves_teacher_bit_identical():
    student = _net()
    teacher = copy.deepcopy(student)
    ema = EMA(teacher, student, alpha=0.5, warmup_steps=3)
    _train_step(student, torch.Generator().manual_seed(2))
    before = _state(teacher)
    ema.update(False)
    ema.update(torch.tensor(False))
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert ema.num_updates == 0


def test_functional_and_reference_agree():
    student = _net()
    fused, ref = copy.deepcopy(student), copy.deepcopy(student)
    gen = torch.Generator().manual_seed(3)
    for _ in range(10):
        _train_step(student, gen)
        ema_update_(fused, student, 0.95)
        ema_update_reference_(ref, student, 0.95)
    _assert_states_close(fused, ref)


def test_warmup_schedule():
    """alpha_eff = min(alpha, (1+n)/(10+n)) for the first warmup_steps updates, then alpha."""
    student = nn.Linear(1, 1, bias=False)
    teacher = copy.deepcopy(student)
    ema = EMA(teacher, student, alpha=0.5, warmup_steps=2)
    with torch.no_grad():
        teacher.weight.fill_(0.0)
        student.weight.fill_(1.0)
    w, expected = 0.0, []
    for n in range(4):
        a = min(0.5, (1 + n) / (10 + n)) if n < 2 else 0.5
        w = a * w + (1 - a) * 1.0
        expected.append(w)
        ema.update()
        assert teacher.weight.item() == pytest.approx(w, rel=1e-6)
    assert expected[0] == pytest.approx(0.9)
    state = ema.state_dict()
    resumed = EMA(copy.deepcopy(teacher), student, alpha=0.5, warmup_steps=2)
    resumed.load_state_dict(state)
    assert resumed.num_updates == 4


def test_teacher_frozen_and_mixed_precision_student():
    student = _net().half()
    teacher = copy.deepcopy(student).float()
    teacher.train()
    ema = EMA(teacher, student, alpha=0.9)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    before = _state(teacher)
    ema.update()
    for k, v in teacher.state_dict().items():
        if v.is_floating_point():
            assert v.dtype == torch.float32
            torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * student.state_dict()[k].float(), msg=k)


def test_mismatched_models_raise():
    with pytest.raises(ValueError, match="names"):
        EMA(_net(), nn.Sequential(nn.Conv2d(3, 8, 3)))
    other = _net()
    other[3] = nn.Conv2d(8, 5, 1)
    with pytest.raises(ValueError, match="3.weight"):
        ema_update_(_net(), other, 0.9)
    with pytest.raises(ValueError, match="alpha"):
        EMA(_net(), _net(), alpha=1.5)
