"""The class-balance guard rail: running pseudo-label share against a plain loop, weights, damping, state."""
from __future__ import annotations

import pytest
import torch

from distseg.ops.balance import ClassBalance, labelled_share, source_class_counts
from distseg.ops.pseudo import pseudo_label


def test_the_running_share_matches_a_loop_and_the_first_batch_sets_it():
    bal = ClassBalance([0.7, 0.3], bound=2.0, momentum=0.8)
    assert torch.equal(bal.ratio(), torch.ones(1, 2)) and bal.damping() == 1.0, "no evidence yet: no alarm"
    batches = [torch.tensor([90, 10]), torch.tensor([0, 0]), torch.tensor([50, 50]), torch.tensor([99, 1])]
    expected, seen = None, False
    for hist in batches:
        bal.update(hist)
        if hist.sum() > 0:
            share = [float(h) / float(hist.sum()) for h in hist]
            expected = share if not seen else [0.8 * e + 0.2 * s for e, s in zip(expected, share)]
            seen = True
        torch.testing.assert_close(bal.share[0], torch.tensor(expected))
    torch.testing.assert_close(bal.ratio()[0], torch.tensor(expected) / torch.tensor([0.7, 0.3]))


def test_weights_restore_the_labelled_share_within_the_bound_and_keep_the_loss_scale():
    bal = ClassBalance([0.6, 0.3, 0.1], bound=4.0, momentum=0.0)
    bal.update(torch.tensor([700, 250, 50]))  # building-like class 2 at half its labelled share
    w, share = bal.class_weights()[0], bal.share[0]
    torch.testing.assert_close((share * w).sum(), torch.tensor(1.0))  # mean weight over kept pixels is 1
    torch.testing.assert_close(share * w / (share * w).sum(), bal.target)  # weighted share = labelled share
    assert w[2] > w[1] > w[0]
    assert bal.damping() == 1.0, "a factor 2 is within the bound 4"


def test_a_collapsing_class_is_clipped_and_damps_lambda_u():
    bal = ClassBalance([0.7, 0.3], bound=2.0, momentum=0.0)
    bal.update(torch.tensor([98, 2]))  # building share 2 % against 30 %: 15× too few
    ratio = bal.ratio()[0]
    assert ratio[1] == pytest.approx(0.02 / 0.3, rel=1e-5)
    raw = torch.tensor([1 / (0.98 / 0.7), 2.0])  # class 0 unclipped (1/1.4), class 1 clipped at r = 2
    torch.testing.assert_close(bal.class_weights()[0], raw / (bal.share[0] * raw).sum())
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
    w = bal.class_weights()[0]
    for b in range(2):
        for i in range(5):
            for j in range(5):
                if pl.keep[b, i, j]:
                    expected[b, i, j] = w[pl.labels[b, i, j]]
    torch.testing.assert_close(bal.pixel_weights(pl.labels, pl.keep), expected)
    torch.testing.assert_close(bal.share[0], pl.class_hist.float() / pl.class_hist.sum())


def test_unlabelled_classes_are_never_corrected_and_bad_batches_are_ignored():
    bal = ClassBalance([0.8, 0.2, 0.0], bound=2.0, momentum=0.5)
    bal.update(torch.tensor([80, 10, 10]))
    assert bal.ratio()[0, 2] == 1.0 and bal.class_weights()[0, 2] / bal.class_weights()[0, 0] == pytest.approx(1.0)
    before = bal.state_dict()
    bal.update(torch.tensor([float("nan"), 1.0, 1.0]))
    bal.update(torch.zeros(3))
    assert torch.equal(bal.share, before["share"])
    with pytest.raises(ValueError, match=r"shape \(1, 3\), expected 1 source\(s\) × 2 classes"):
        ClassBalance([0.5, 0.5]).update(torch.ones(3))


def test_state_round_trips_and_checks_the_class_count():
    bal = ClassBalance([0.6, 0.4], momentum=0.9)
    bal.update(torch.tensor([10, 90]))
    again = ClassBalance([0.6, 0.4], momentum=0.9)
    again.load_state_dict(bal.state_dict())
    assert torch.equal(again.share, bal.share) and bool(again.seen.all())
    bal.update(torch.tensor([50, 50]))
    again.update(torch.tensor([50, 50]))
    assert torch.equal(again.share, bal.share), "a resumed tracker continues exactly"
    with pytest.raises(ValueError, match="1 source.s. × 2 classes, expected 1 × 3"):
        ClassBalance([0.2, 0.3, 0.5]).load_state_dict(bal.state_dict())
    with pytest.raises(ValueError, match="bound must be > 1"):
        ClassBalance([0.5, 0.5], bound=1.0)
    with pytest.raises(ValueError, match="non-negative finite class shares"):
        ClassBalance([0.5, -0.1])


def test_source_class_counts_match_a_loop_over_kept_pixels():
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (4, 6, 5), generator=gen)
    keep = torch.rand(4, 6, 5, generator=gen) > 0.4
    labels = torch.where(keep, labels, torch.full_like(labels, 255))  # pseudo-labels carry ignore where not kept
    source = torch.tensor([1, 0, 2, 1])
    expected = torch.zeros(3, 3)
    for b in range(4):
        for i in range(6):
            for j in range(5):
                if keep[b, i, j]:
                    expected[source[b], labels[b, i, j]] += 1
    torch.testing.assert_close(source_class_counts(labels, keep, source, 3, 3), expected)
    per_pixel = source[:, None, None].expand(4, 6, 5)
    torch.testing.assert_close(source_class_counts(labels, keep, per_pixel, 3, 3), expected)


def test_a_source_collapsing_under_a_healthy_one_is_seen_and_damps_where_one_pooled_share_does_not():
    """The Kampala case: the labelled town's pool chips keep buildings, the target's do not; pooled, the ratio looks
    fine; per source, the target's ratio is the alarm."""
    source_counts = torch.tensor([[450.0, 550.0],  # source 0 (labelled town): 55 % building
                                  [196.0, 4.0]])   # source 1 (the imagery to map): 2 % building
    pooled = ClassBalance([0.7, 0.3], bound=2.0, momentum=0.0)
    pooled.update(source_counts.sum(dim=0))
    assert float(pooled.damping()) == 1.0, "pooled: 554 / 1200 buildings, ratio 1.5, within the bound"
    per_source = ClassBalance([0.7, 0.3], bound=2.0, momentum=0.0, sources=2)
    per_source.update(source_counts)
    share = source_counts / source_counts.sum(dim=1, keepdim=True)
    torch.testing.assert_close(per_source.ratio(), share / torch.tensor([0.7, 0.3]))
    assert float(per_source.damping()) == pytest.approx(2.0 / (0.3 / 0.02), rel=1e-5)
    w = per_source.class_weights()
    torch.testing.assert_close((per_source.share * w).sum(dim=1), torch.ones(2))  # each source's mean weight is 1
    assert w[1, 1] / w[1, 0] > w[0, 1] / w[0, 0], "the target's buildings weigh more than the labelled town's"
    labels, keep = torch.tensor([[[1, 0]], [[1, 0]]]), torch.ones(2, 1, 2, dtype=torch.bool)
    source = torch.tensor([[[0, 0]], [[1, 0]]])  # a CutMix box carried source 0 into sample 1's right pixel
    expected = torch.tensor([[[w[0, 1], w[0, 0]]], [[w[1, 1], w[0, 0]]]])
    torch.testing.assert_close(per_source.pixel_weights(labels, keep, source), expected)


def test_each_source_keeps_its_own_running_share_and_first_batch():
    bal = ClassBalance([0.5, 0.5], momentum=0.5, sources=2)
    bal.update(torch.tensor([[30.0, 10.0], [0.0, 0.0]]))  # source 1 keeps nothing yet: still the target
    torch.testing.assert_close(bal.share, torch.tensor([[0.75, 0.25], [0.5, 0.5]]))
    bal.update(torch.tensor([[10.0, 30.0], [10.0, 90.0]]))  # source 0 blends; source 1's first batch sets it
    torch.testing.assert_close(bal.share, torch.tensor([[0.5, 0.5], [0.1, 0.9]]))
    assert bal.seen.tolist() == [True, True]
    with pytest.raises(ValueError, match="sources must be >= 1"):
        ClassBalance([0.5, 0.5], sources=0)


def test_a_single_source_state_written_before_per_source_tracking_still_resumes():
    bal = ClassBalance([0.6, 0.4], momentum=0.9)
    bal.update(torch.tensor([10, 90]))
    again = ClassBalance([0.6, 0.4], momentum=0.9)
    again.load_state_dict({"share": bal.share[0].clone(), "seen": torch.tensor(True)})  # [C] share, scalar seen
    assert torch.equal(again.share, bal.share) and torch.equal(again.seen, bal.seen)
    with pytest.raises(ValueError, match="1 source.s. × 2 classes, expected 2 × 2"):
        ClassBalance([0.6, 0.4], sources=2).load_state_dict(bal.state_dict())


def test_labelled_share_reads_the_manifest():
    manifest = {"splits": {"train": {"class_pixels": {"background": 1932967, "building": 819545}},
                           "unlabeled": {"samples": 3}}}
    share = labelled_share(manifest, ["background", "building"])
    assert share == pytest.approx([1932967 / 2752512, 819545 / 2752512])
    with pytest.raises(ValueError, match="split 'unlabeled'"):
        labelled_share(manifest, ["background", "building"], split="unlabeled")
    with pytest.raises(ValueError, match="no labelled pixel"):
        labelled_share(manifest, ["road"])
