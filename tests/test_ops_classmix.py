"""Cross-domain ClassMix (distseg/ops/classmix.py) against a per-pixel reference."""
from __future__ import annotations

import pytest
import torch

from distseg.ops.classmix import class_halves, paste_labelled

IGNORE = 255


def _masks() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 4, (6, 12, 12), generator=g)
    masks[0] = 2  # one class present: it is the majority, so nothing is pasted
    masks[3, :8] = 1  # class 1 is the majority of crop 3
    masks[1, :, :6] = IGNORE  # ignored pixels are never pasted
    masks[2] = IGNORE  # nothing to paste
    return masks


def test_class_halves_takes_half_the_minority_classes_rounded_up_and_all_their_pixels():
    masks = _masks()
    chosen = class_halves(masks, 4, IGNORE, torch.Generator().manual_seed(1))
    for b in range(masks.shape[0]):
        valid = masks[b] != IGNORE
        values = masks[b][valid]
        majority = int(torch.bincount(values).argmax()) if values.numel() else None
        present = set(values.tolist()) - {majority}
        picked = set(masks[b][chosen[b]].tolist())
        assert len(picked) == (len(present) + 1) // 2 and picked <= present
        for c in picked:  # every pixel of a picked class, and nothing else
            assert torch.equal(chosen[b] & (masks[b] == c), masks[b] == c)
        assert not chosen[b][~valid].any()
    assert not chosen[0].any() and not chosen[2].any() and not (chosen[3] & (masks[3] == 1)).any()


def test_paste_labelled_matches_a_per_pixel_reference():
    g = torch.Generator().manual_seed(3)
    image, src = torch.rand(5, 3, 12, 12, generator=g), torch.rand(3, 3, 12, 12, generator=g)
    labels = torch.randint(0, 4, (5, 12, 12), generator=g)
    keep = torch.rand(5, 12, 12, generator=g) > 0.5
    src_mask = _masks()[:3]
    mixed = paste_labelled(image, labels, keep, src, src_mask, num_classes=4, ignore_index=IGNORE,
                           generator=torch.Generator().manual_seed(7))
    index = torch.arange(5) % 3  # pool sample i takes labelled crop i % 3, with its own draw of classes
    chosen = class_halves(src_mask[index], 4, IGNORE, torch.Generator().manual_seed(7))
    for i in range(5):
        j = i % 3
        for y in range(12):
            for x in range(12):
                p = bool(chosen[i, y, x])
                assert bool(mixed.pasted[i, y, x]) == p
                assert torch.equal(mixed.image[i, :, y, x], src[j, :, y, x] if p else image[i, :, y, x])
                assert int(mixed.labels[i, y, x]) == (int(src_mask[j, y, x]) if p else int(labels[i, y, x]))
                assert bool(mixed.keep[i, y, x]) == (p or bool(keep[i, y, x]))


def test_paste_probability_zero_changes_nothing_and_sizes_must_match():
    image, labels = torch.rand(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.int64)
    keep = torch.zeros(2, 8, 8, dtype=torch.bool)
    src_mask = torch.ones(2, 8, 8, dtype=torch.int64)
    src_mask[:, :2] = 0
    mixed = paste_labelled(image, labels, keep, torch.rand(2, 3, 8, 8), src_mask, num_classes=2,
                           ignore_index=IGNORE, prob=0.0)
    assert torch.equal(mixed.image, image) and torch.equal(mixed.labels, labels) and not mixed.keep.any()
    with pytest.raises(ValueError, match="differ in size"):
        paste_labelled(image, labels, keep, torch.rand(2, 3, 6, 6), src_mask[:, :6, :6], num_classes=2,
                       ignore_index=IGNORE)
