"""Fused pseudo-labelling against naive references (unfused ops, and a per-pixel Python loop)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distseg.ops import pseudo as pseudo_mod
from distseg.ops.pseudo import PseudoLabels, pseudo_label, pseudo_label_reference, tta_probs

_EXACT = ("labels", "keep", "kept_fraction", "class_hist")


def _assert_same(got: PseudoLabels, ref: PseudoLabels) -> None:
    """Discrete outputs identical; float statistics equal up to float32 rounding."""
    for name in PseudoLabels._fields:
        a, b = getattr(got, name), getattr(ref, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if name in _EXACT:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def _logits(seed: int = 0, b: int = 4, c: int = 5, h: int = 7, w: int = 6, scale: float = 3.0) -> torch.Tensor:
    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed)) * scale
    x[0, 1] = x[0, 3]  # exact argmax ties between classes 1 and 3 wherever they lead
    x[1, :, :2] = 0.0  # uniform rows: an all-way tie, never confident
    return x


CASES = [
    dict(tau=0.5),
    dict(tau=0.0),
    dict(tau=1.0),
    dict(tau=0.6, max_entropy=0.4),
    dict(tau=0.3, tile_keep_quantile=0.5),
    dict(tau=0.0, max_entropy=0.7, tile_keep_quantile=0.3),
    dict(tau=torch.tensor([0.9, 0.2, 0.5, 0.0, 1.0])),
    dict(tau=torch.tensor([0.3, 0.6, 0.4, 0.8, 0.5]), max_entropy=0.8, tile_keep_quantile=0.5),
]


@pytest.mark.parametrize("kwargs", CASES)
def test_eager_matches_unfused_reference(kwargs):
    x = _logits()
    _assert_same(pseudo_label(x, compile=False, **kwargs), pseudo_label_reference(x, **kwargs))


def test_matches_per_pixel_loop_including_ties():
    x = _logits(b=2, h=3, w=4)
    tau, max_entropy = 0.55, 0.8
    out = pseudo_label(x, tau=tau, max_entropy=max_entropy, compile=False)
    for b in range(x.shape[0]):
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                v = x[b, :, i, j].double()
                p = torch.exp(v - v.max()) / torch.exp(v - v.max()).sum()
                label = max(range(len(p)), key=lambda c: (p[c].item(), -c))  # first of the maxima
                ent = -(p * p.log()).sum().item() / math.log(len(p))
                keep = p[label].item() >= tau and ent <= max_entropy
                assert out.labels[b, i, j].item() == (label if keep else 255)
                assert out.keep[b, i, j].item() == keep
                assert out.confidence[b, i, j].item() == pytest.approx(p[label].item(), rel=1e-5)
                assert out.entropy[b, i, j].item() == pytest.approx(ent, abs=1e-5)
    assert out.labels[0][x[0, 1] == x[0].amax(0)].ne(3).all()  # a 1-vs-3 tie never picks 3


def test_tau_extremes_and_all_ignored_tiles():
    probs = F.softmax(_logits(), 1)
    probs[2] = F.one_hot(probs[2].argmax(0), 5).permute(2, 0, 1).float()  # a certain tile
    everything = pseudo_label(probs, tau=0.0, from_logits=False, compile=False)
    assert everything.keep.all() and everything.class_hist.sum() == probs[:, 0].numel()
    certain = pseudo_label(probs, tau=1.0, from_logits=False, compile=False)
    assert certain.keep[2].all() and not certain.keep[[0, 1, 3]].any()
    assert torch.equal(certain.kept_fraction, torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert (certain.labels[[0, 1, 3]] == 255).all()
    assert torch.equal(certain.class_hist, torch.bincount(probs[2].argmax(0).flatten(), minlength=5))
    assert certain.mean_entropy[2] == 0.0
    uniform = pseudo_label(torch.zeros(2, 4, 3, 3), tau=0.3, compile=False)
    assert not uniform.keep.any() and uniform.class_hist.sum() == 0
    torch.testing.assert_close(uniform.mean_entropy, torch.ones(2))


def test_tile_selection_ties_go_to_earlier_tile():
    tile = _logits()[3]
    x = torch.stack([tile * 0.1, tile, tile, tile * 5])  # tiles 1 and 2 tie on mean entropy
    out = pseudo_label(x, tau=0.0, tile_keep_quantile=0.5, compile=False)
    assert out.keep.flatten(1).all(1).tolist() == [False, True, False, True]
    assert torch.equal(out.labels[2], torch.full_like(out.labels[2], 255))
    _assert_same(out, pseudo_label_reference(x, tau=0.0, tile_keep_quantile=0.5))
    assert pseudo_label(x, tau=0.0, tile_keep_quantile=0.01, compile=False).keep.flatten(1).any(1).tolist() == [
        False, False, False, True
    ]


def test_a_per_class_tau_is_read_at_each_pixels_argmax_class():
    x = _logits(b=2, h=5, w=5)
    tau = torch.tensor([0.9, 0.2, 0.5, 0.0, 1.0])
    out = pseudo_label(x, tau=tau, compile=False)
    p = F.softmax(x, 1)
    confidence, label = p.max(1)
    expected = torch.tensor([[[confidence[b, i, j].item() >= tau[label[b, i, j]].item() for j in range(5)]
                              for i in range(5)] for b in range(2)])
    assert torch.equal(out.keep, expected) and out.keep.any() and not out.keep.all()
    same = torch.full((5,), 0.5)
    _assert_same(pseudo_label(x, tau=same, compile=False), pseudo_label(x, tau=0.5, compile=False))


def test_bad_input_raises():
    with pytest.raises(ValueError, match="B×C×H×W"):
        pseudo_label(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="tau"):
        pseudo_label(torch.zeros(1, 3, 2, 2), tau=1.5)
    with pytest.raises(ValueError, match="tile_keep_quantile"):
        pseudo_label(torch.zeros(1, 3, 2, 2), tile_keep_quantile=0.0)
    with pytest.raises(ValueError, match=r"one value per class \(3\), got shape \(4,\)"):
        pseudo_label(torch.zeros(1, 3, 2, 2), tau=torch.full((4,), 0.5))


def test_compile_failure_falls_back_to_eager_once(monkeypatch):
    calls = []

    def broken_compile(fn):
        calls.append(fn)
        raise RuntimeError("no compiler")

    monkeypatch.setattr(pseudo_mod.torch, "compile", broken_compile)
    monkeypatch.setattr(pseudo_mod._Compiled, "fn", None)
    monkeypatch.setattr(pseudo_mod._Compiled, "failed", False)
    x = _logits()
    with pytest.warns(UserWarning, match="no compiler"):
        out = pseudo_label(x, tau=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pseudo_label(x, tau=0.5)
    assert len(calls) == 1
    _assert_same(out, pseudo_label_reference(x, tau=0.5))


@pytest.mark.slow
def test_compiled_matches_eager():
    """Inductor's fused kernels give the eager results (discrete outputs bit-identical)."""
    x = _logits(seed=7, b=2, h=16, w=16)
    for kwargs in (dict(tau=0.5, max_entropy=0.6, tile_keep_quantile=0.5), dict(tau=0.0),
                   dict(tau=torch.tensor([0.9, 0.2, 0.5, 0.0, 1.0]))):
        _assert_same(pseudo_label(x, compile=True, **kwargs), pseudo_label(x, compile=False, **kwargs))
    assert not pseudo_mod._Compiled.failed


# ------------------------------------------------------------------------------ TTA


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv2d(3, 4, 3, padding=1)  # not flip-equivariant: inverting the flips matters


def test_tta_matches_manual_average_and_chunking():
    model, x = _model(), torch.rand(2, 3, 8, 9)
    with torch.no_grad():
        sm = lambda t: F.softmax(model(t), 1)  # noqa: E731
        manual = (
            sm(x)
            + sm(x.flip(-1)).flip(-1)
            + sm(x.flip(-2)).flip(-2)
            + sm((x * 1.2).clamp(0, 1))
            + sm((x * 0.8).clamp(0, 1))
        ) / 5
        single = sm(x)
    got = tta_probs(model, x, brightness=0.2)
    torch.testing.assert_close(got, manual)
    torch.testing.assert_close(tta_probs(model, x, brightness=0.2, views_per_forward=2), manual)
    torch.testing.assert_close(tta_probs(model, x, transforms=("identity",)), single)
    assert not got.requires_grad


def test_tta_result_is_an_ordinary_tensor_a_loss_can_save_for_backward():
    """The views run under inference_mode, but KL consistency multiplies the student's log-probabilities by the
    teacher's probabilities, which autograd saves: an inference tensor would be refused there."""
    model, x = _model(), torch.rand(2, 3, 8, 9)
    probs = tta_probs(model, x, transforms=("identity", "hflip"))
    assert not probs.is_inference()
    logits = torch.randn(2, 4, 8, 9, requires_grad=True)
    (probs * F.log_softmax(logits, 1)).sum().backward()
    torch.testing.assert_close(logits.grad, probs - probs.sum(1, keepdim=True) * F.softmax(logits, 1))


def test_tta_equivariant_model_is_flip_invariant_and_bad_names_raise():
    model, x = nn.Conv2d(3, 4, 1), torch.rand(1, 3, 5, 5)
    with torch.no_grad():
        plain = F.softmax(model(x), 1)
    torch.testing.assert_close(tta_probs(model, x, transforms=("identity", "hflip", "vflip")), plain)
    with pytest.raises(ValueError, match="rot90"):
        tta_probs(model, x, transforms=("identity", "rot90"))
