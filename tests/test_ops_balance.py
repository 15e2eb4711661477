"""The class-balance guard rail: running pseudo-label share against a plain loop, weights, damping, state."""
from __future__ import annotations

import pytest
import torch

from distseg.ops.balance import ClassBalance, labelled_share
from distseg.ops.pseudo import pseudo_label


def test_the_running_share_matches_a_loop_and_the_first_batch_sets_it():
    bal = ClassBalance([0.7, 0.3], bound=2.0, momentum=0.8)
    assert torch.equal(bal.ratio(), torch.ones(2)) and bal.damping() == 1.0, "no evidence yet: no alarm"
    batches = [torch.tensor([90, 10]), torch.tensor([0, 0]), torch.tensor([50, 50]), torch.tensor([99, 1])]
    expected, seen = None, False
    for hist in batches:
        bal.update(hist)
        if hist.sum() > 0:
            share = [float(h) / float(hist.sum()) for h in hist]
            expected = share if not seen else [0.8 * e + 0.2 * s for e, s in zip(expected, share)]
            seen = True
        torch.testing.assert_close(bal.share, torch.tensor(expected))
    torch.testing.assert_close(bal.ratio(), torch.tensor(expected) / torch.tensor([0.7, 0.3]))


def test_weights_restore_the_labelled_share_within_the_bound_and_keep_the_loss_scale():
    bal = ClassBalance([0.6, 0.3, 0.1], bound=4.0, momentum=0.0)
    bal.update(torch.tensor([700, 250, 50]))  # building-like class 2 at half its labelled share
    w = bal.class_weights()
    torch.testing.assert_close((bal.share * w).sum(), torch.tensor(1.0))  # mean weight over kept pixels is 1
    torch.testing.assert_close(bal.share * w / (bal.share * w).sum(), bal.target)  # weighted share = labelled share
    assert w[2] > w[1] > w[0]
    assert bal.damping() == 1.0, "a factor 2 is within the bound 4"


def test_a_collapsing_class_is_clipped_and_damps_lambda_u():
    bal = ClassBalance([0.7, 0.3], bound=2.0, momentum=0.0)
    bal.update(torch.tensor([98, 2]))  # building share 2 % against 30 %: 15× too few
    ratio = bal.ratio()
    assert ratio[1] == pytest.approx(0.02 / 0.3, rel=1e-5)
    raw = torch.tensor([1 / (0.98 / 0.7), 2.0])  # class 0 unclipped (1/1.4), class 1 clipped at r = 2
    torch.testing.assert_close(bal.class_weights(), raw / (bal.share * raw).sum())
    assert float(bal.damping()) == pytest.approx(2.0 / (0.3 / 0.02), rel=1e-5)
    bal.update(torch.tensor([20, 80]))  # the opposite run-away damps too; the worst excess is background's 0.7/0.2
    assert float(bal.damping()) == pytest.approx(2.0 / (0.7 / 0.2), rel=1e-5)
    bal.update(torch.tensor([100, 0]))  # a vanished class: a large finite ratio, damping near 0, weights finite
    assert 0 < float(bal.damping()) < 1e-4 and bool(bal.class_weights().isfinite().all())


def test_pixel_weights_follow_the_pseudo_labels_of_kept_pixels():
    probs = torch.softmax(torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 3, dim=1)
    pl = pseudo_label(probs, tau=0.6, from_logits=False, compile=False)
    bal = ClassBalance([0.5, 0.3, 0.2], momentum=0.0)
    bal.update(pl.class_hist)
    expected = torch.zeros(2, 5, 5)
    w = bal.class_weights()
    for b in range(2):
        for i in range(5):
            for j in range(5):
                if pl.keep[b, i, j]:
                    expected[b, i, j] = w[pl.labels[b, i, j]]
    torch.testing.assert_close(bal.pixel_weights(pl.labels, pl.keep), expected)
    torch.testing.assert_close(bal.share, pl.class_hist.float() / pl.class_hist.sum())


def test_unlabelled_classes_are_never_corrected_and_bad_batches_are_ignored():
    bal = ClassBalance([0.8, 0.2, 0.0], bound=2.0, momentum=0.5)
    bal.update(torch.tensor([80, 10, 10]))
    assert bal.ratio()[2] == 1.0 and bal.class_weights()[2] / bal.class_weights()[0] == pytest.approx(1.0)
    before = bal.state_dict()
    bal.update(torch.tensor([float("nan"), 1.0, 1.0]))
    bal.update(torch.zeros(3))
    assert torch.equal(bal.share, before["share"])
    with pytest.raises(ValueError, match="3 classes, expected 2"):
        ClassBalance([0.5, 0.5]).update(torch.ones(3))


def test_state_round_trips_and_checks_the_class_count():
    bal = ClassBalance([0.6, 0.4], momentum=0.9)
    bal.update(torch.tensor([10, 90]))
    again = ClassBalance([0.6, 0.4], momentum=0.9)
    again.load_state_dict(bal.state_dict())
    assert torch.equal(again.share, bal.share) and bool(again.seen)
    bal.update(torch.tensor([50, 50]))
    again.update(torch.tensor([50, 50]))
    assert torch.equal(again.share, bal.share), "a resumed tracker continues exactly"
    with pytest.raises(ValueError, match="for 2 classes, expected 3"):
        ClassBalance([0.2, 0.3, 0.5]).load_state_dict(bal.state_dict())
    with pytest.raises(ValueError, match="bound must be > 1"):
        ClassBalance([0.5, 0.5], bound=1.0)
    with pytest.raises(ValueError, match="non-negative finite class shares"):
        ClassBalance([0.5, -0.1])


def test_labelled_share_reads_the_manifest():
    manifest = {"splits": {"train": {"class_pixels": {"background": 1932967, "building": 819545}},
                           "unlabeled": {"samples": 3}}}
    share = labelled_share(manifest, ["background", "building"])
    assert share == pytest.approx([1932967 / 2752512, 819545 / 2752512])
    with pytest.raises(ValueError, match="split 'unlabeled'"):
        labelled_share(manifest, ["background", "building"], split="unlabeled")
    with pytest.raises(ValueError, match="no labelled pixel"):
        labelled_share(manifest, ["road"])
