"""Losses against direct reference computations (numpy / explicit loops)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distseg.config import ConfigError, from_dict
from distseg.data.batch import Batch
from distseg.fisher import compute_fisher, load_fisher, save_fisher
from distseg.losses import EWC, SupervisedLossConfig, consistency_loss, kd_loss, supervised_loss
from distseg.models.weights import WeightsError


def _logits_target(seed: int = 0, b: int = 2, c: int = 4, h: int = 6, w: int = 5, ignore_frac: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, h, w, generator=g) * 2
    target = torch.randint(0, c, (b, h, w), generator=g)
    target[torch.rand(b, h, w, generator=g) < ignore_frac] = 255
    return logits.requires_grad_(True), target


def _np_nll_prob(logits: torch.Tensor, target: torch.Tensor):
    """Per-pixel NLL and true-class probability of the valid pixels, in float64 numpy."""
    x = logits.detach().double().numpy().transpose(0, 2, 3, 1).reshape(-1, logits.shape[1])
    t = target.numpy().reshape(-1)
    valid = t != 255
    x, t = x[valid], t[valid]
    logp = x - x.max(1, keepdims=True) - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True))
    nll = -logp[np.arange(len(t)), t]
    return nll, np.exp(-nll)


def test_ce_matches_torch_with_ignore_index():
    logits, target = _logits_target()
    got = supervised_loss(logits, target, SupervisedLossConfig(kind="ce"))
    nll, _ = _np_nll_prob(logits, target)
    assert got.item() == pytest.approx(nll.mean(), rel=1e-5)
    assert got.item() == pytest.approx(F.cross_entropy(logits, target, ignore_index=255).item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["ce", "ohem"])
def test_all_ignored_gives_zero_with_grad(kind):
    logits, target = _logits_target()
    target[:] = 255
    loss = supervised_loss(logits, target, SupervisedLossConfig(kind=kind, ohem_min_kept=5))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize("min_kept, thresh", [(1, 0.7), (10, 0.05), (25, 0.3), (1000, 0.7)])
def test_ohem_matches_reference_and_keeps_min_kept(min_kept, thresh):
    logits, target = _logits_target(seed=3)
    got = supervised_loss(logits, target, SupervisedLossConfig(kind="ohem", ohem_thresh=thresh, ohem_min_kept=min_kept))
    nll, prob = _np_nll_prob(logits, target)
    kth = np.sort(prob)[min(min_kept, len(prob)) - 1]
    keep = (prob < thresh) | (prob <= kth)
    assert keep.sum() >= min(min_kept, len(prob))
    assert got.item() == pytest.approx(nll[keep].mean(), rel=1e-5)


def test_ohem_easy_pixels_still_keeps_min_kept():
    """All pixels confidently right: none is below the threshold, yet the min_kept hardest are used."""
    target = torch.randint(0, 3, (1, 8, 8), generator=torch.Generator().manual_seed(0))
    logits = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 5
    logits[0, target[0, 0, 0], 0, 0] -= 1.0  # two slightly harder (still easy) pixels
    logits[0, target[0, 0, 1], 0, 1] -= 0.5
    nll, prob = _np_nll_prob(logits, target)
    assert prob.min() > 0.7
    got = supervised_loss(logits, target, SupervisedLossConfig(kind="ohem", ohem_min_kept=2))
    assert got.item() == pytest.approx(np.sort(nll)[-2:].mean(), rel=1e-4)


def test_config_validation_and_from_dict():
    assert from_dict(SupervisedLossConfig, {"kind": "ce"}).kind == "ce"
    with pytest.raises(ConfigError, match="kind"):
        from_dict(SupervisedLossConfig, {"kind": "focal"})
    with pytest.raises(ValueError, match="ohem_thresh"):
        SupervisedLossConfig(ohem_thresh=0.0)
    with pytest.raises(ValueError, match="target"):
        supervised_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, dtype=torch.long), SupervisedLossConfig())


def _np_kl(t_logits, s_logits, T):
    def log_softmax(x):
        x = x.double().numpy() / T
        return x - x.max(1, keepdims=True) - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True))

    lt, ls = log_softmax(t_logits.detach()), log_softmax(s_logits.detach())
    return (np.exp(lt) * (lt - ls)).sum(1) * T * T


def test_kd_zero_at_equal_logits():
    logits, _ = _logits_target()
    assert kd_loss(logits, logits.detach().clone(), T=3.0).abs().item() < 1e-6


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_kd_matches_direct_computation(T):
    s, target = _logits_target(seed=1)
    t, _ = _logits_target(seed=2)
    mask = target != 255
    ref = _np_kl(t, s, T)
    assert kd_loss(s, t, T=T).item() == pytest.approx(ref.mean(), rel=1e-5)
    assert kd_loss(s, t, T=T, mask=mask).item() == pytest.approx(ref[mask.numpy()].mean(), rel=1e-5)
    loss = kd_loss(s, t.requires_grad_(True), T=T)
    loss.backward()
    assert t.grad is None and s.grad is not None


def test_consistency_ce_and_kl_on_kept_pixels():
    s, labels = _logits_target(seed=4, ignore_frac=0.0)
    keep = torch.rand(labels.shape, generator=torch.Generator().manual_seed(5)) < 0.5
    pseudo = torch.where(keep, labels, torch.full_like(labels, 255))
    nll, _ = _np_nll_prob(s, pseudo)
    assert consistency_loss(s, pseudo, keep).item() == pytest.approx(nll.mean(), rel=1e-5)
    t, _ = _logits_target(seed=6)
    probs = F.softmax(t, 1)
    ref = _np_kl(t, s, 1.0)[keep.numpy()].mean()
    got = consistency_loss(s, pseudo, keep, kind="kl", teacher_probs=probs)
    assert got.item() == pytest.approx(ref, rel=1e-4)
    with pytest.raises(ValueError, match="teacher_probs"):
        consistency_loss(s, pseudo, keep, kind="kl")


def test_consistency_pixel_weights_scale_each_kept_pixel_before_the_mean():
    s, labels = _logits_target(seed=7, ignore_frac=0.0)
    g = torch.Generator().manual_seed(8)
    keep = torch.rand(labels.shape, generator=g) < 0.6
    pseudo = torch.where(keep, labels, torch.full_like(labels, 255))
    weights = torch.rand(labels.shape, generator=g) * 3
    ce = F.cross_entropy(s, pseudo, reduction="none", ignore_index=255)
    expected = (ce * weights * keep).sum() / keep.sum()
    got = consistency_loss(s, pseudo, keep, pixel_weights=weights)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert consistency_loss(s, pseudo, keep, pixel_weights=torch.ones_like(weights)).item() == \
        pytest.approx(consistency_loss(s, pseudo, keep).item(), rel=1e-6)


def test_consistency_nothing_kept_is_zero_with_grad():
    s, labels = _logits_target()
    loss = consistency_loss(s, torch.full_like(labels, 255), torch.zeros_like(labels, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and s.grad is not None


# --------------------------------------------------------------------------------------- EWC


def _tiny_net(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, num_classes, 1))


def _anchor(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_ewc_zero_at_anchor_and_quadratic_in_distance():
    model = _tiny_net()
    fisher = {k: torch.rand_like(v) for k, v in model.named_parameters()}
    ewc = EWC(_anchor(model), fisher, lam=2.0).bind(model)
    assert ewc.penalty().item() == 0.0
    deltas = {k: torch.randn_like(v) for k, v in model.named_parameters()}
    expected = 0.5 * 2.0 * sum(float((fisher[k] * deltas[k] ** 2).sum()) for k in deltas)
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.add_(deltas[k])
    assert ewc.penalty().item() == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.add_(deltas[k])  # now at twice the distance
    assert ewc.penalty().item() == pytest.approx(4 * expected, rel=1e-5)
    ewc.penalty().backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2.0 * fisher[k] * 2 * deltas[k], rtol=1e-4, atol=1e-5)


def test_ewc_weighted_by_fisher_and_skips_shape_mismatch():
    teacher = _tiny_net(num_classes=3)
    fisher = {k: torch.zeros_like(v) for k, v in teacher.named_parameters()}
    fisher["0.weight"].fill_(1.0)
    student = _tiny_net(num_classes=5)  # classifier "3.*" has a new shape
    ewc = EWC(_anchor(teacher), fisher, lam=1.0).bind(student)
    assert sorted(ewc.skipped) == ["3.bias", "3.weight"]
    with torch.no_grad():
        student[1].weight.add_(10.0)  # zero Fisher: free to move
    assert ewc.penalty().item() == 0.0
    with torch.no_grad():
        student[0].weight.add_(0.5)
    assert ewc.penalty().item() == pytest.approx(0.5 * 0.25 * student[0].weight.numel(), rel=1e-5)
    unbound = EWC(_anchor(teacher), fisher, lam=1.0)
    assert unbound.penalty(student.named_parameters()).item() == pytest.approx(ewc.penalty().item())
    with pytest.raises(RuntimeError, match="bind"):
        unbound.penalty()


def _batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        Batch(key=["a", "b"], image=torch.rand(2, 3, 8, 8, generator=g), mask=torch.randint(0, 3, (2, 8, 8), generator=g))
        for _ in range(n)
    ]


@pytest.mark.parametrize("labels", ["predicted", "target"])
def test_fisher_matches_per_image_loop(labels):
    model = _tiny_net()
    model[3].bias.requires_grad_(False)
    batches = _batches(3)
    bn_before = model[1].running_mean.clone()
    model.train()
    fisher = compute_fisher(model, iter(batches), n_batches=2, labels=labels)
    assert model.training and torch.equal(model[1].running_mean, bn_before)
    assert "3.bias" not in fisher
    ref = {k: torch.zeros_like(v) for k, v in fisher.items()}
    model.eval()
    images = [(b.image[i : i + 1], b.mask[i : i + 1]) for b in batches[:2] for i in range(2)]
    for image, mask in images:
        model.zero_grad()
        log_p = F.log_softmax(model(image), 1)
        y = log_p.argmax(1) if labels == "predicted" else mask
        log_p.gather(1, y[:, None]).mean().backward()
        for k, p in model.named_parameters():
            if k in ref:
                ref[k] += p.grad**2 / len(images)
    for k in ref:
        torch.testing.assert_close(fisher[k], ref[k], rtol=1e-4, atol=1e-9)


def test_fisher_file_round_trip_and_errors(tmp_path):
    model = _tiny_net()
    fisher = {k: torch.rand_like(v) for k, v in model.named_parameters()}
    path = tmp_path / "fisher.safetensors"
    save_fisher(path, fisher, _anchor(model))
    state = load_fisher(path)
    assert state.fisher.keys() == fisher.keys() and state.anchor.keys() == fisher.keys()
    for k in fisher:
        assert torch.equal(state.fisher[k], fisher[k])
    save_fisher(path, fisher)
    assert load_fisher(path).anchor is None
    with pytest.raises(WeightsError, match="missing.safetensors: no such weights file"):
        load_fisher(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="bad.safetensors: cannot read weights"):
        load_fisher(tmp_path / "bad.safetensors")


def test_fisher_bad_input():
    model = _tiny_net()
    with pytest.raises(ValueError, match="needs labelled batches"):
        compute_fisher(model, [Batch(key=["a"], image=torch.rand(1, 3, 8, 8))], n_batches=1, labels="target")
    with pytest.raises(ValueError, match="empty"):
        compute_fisher(model, [], n_batches=1)
    with pytest.raises(ValueError, match="labels"):
        compute_fisher(model, [], n_batches=1, labels="sampled")
