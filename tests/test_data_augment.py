"""Augmentation: joint geometry keeps image and mask aligned; batched photometric ops match references."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distseg.data.augment import (AugmentConfig, apply_cutmix, cutmix_boxes, gaussian_blur, scale_crop,
                                  strong_photometric, weak_geometric)


def labelled_image(h: int, w: int, seed: int = 0, block: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Blocky 4-class mask whose image's red channel encodes the class (40 * class)."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 4, (h // block, w // block))
    mask = np.kron(cells, np.ones((block, block), dtype=np.int64)).astype(np.uint8)
    image = np.stack([mask * 40, rng.integers(0, 255, mask.shape), np.full(mask.shape, 7)], -1).astype(np.uint8)
    return image, mask


def test_flips_and_turns_are_exact_and_joint():
    image, mask = labelled_image(32, 32)
    cfg = AugmentConfig(crop_size=32, scale_range=(1.0, 1.0), rot90=True)
    for seed in range(8):
        out_img, out_mask = weak_geometric(image, mask, cfg, np.random.default_rng(seed), 255)
        np.testing.assert_array_equal(out_img[..., 0], out_mask * 40)
        candidates = [np.rot90(m, k) for m in (image, image[::-1], image[:, ::-1], image[::-1, ::-1])
                      for k in range(4)]
        assert any(np.array_equal(out_img, c) for c in candidates)


def test_small_image_is_padded_with_zero_and_ignore():
    image, mask = labelled_image(16, 24)
    out_img, out_mask = scale_crop(image, mask, 40, 1.0, np.random.default_rng(0), 255)
    inside = out_mask != 255
    assert inside.sum() == 16 * 24 and (out_img[~inside] == 0).all()
    ys, xs = np.nonzero(inside)
    np.testing.assert_array_equal(out_mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1], mask)
    np.testing.assert_array_equal(out_img[ys.min():ys.max() + 1, xs.min():xs.max() + 1], image)


def test_rescaled_crops_keep_labels_aligned():
    image, mask = labelled_image(128, 128, seed=1, block=16)
    cfg = AugmentConfig(crop_size=48, scale_range=(0.5, 2.0))
    for seed in range(10):
        out_img, out_mask = weak_geometric(image, mask, cfg, np.random.default_rng(seed), 255)
        valid = out_mask != 255
        error = np.abs(out_img[..., 0][valid].astype(int) - 40 * out_mask[valid].astype(int))
        assert (error < 20).mean() > 0.9  # only pixels at class boundaries are interpolated


def naive_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(np.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k1 = torch.exp(-x**2 / (2 * sigma**2))
    k2 = torch.outer(k1, k1) / k1.sum() ** 2
    padded = F.pad(image[None].double(), (radius,) * 4, mode="reflect")
    return F.conv2d(padded, k2.expand(3, 1, -1, -1).contiguous(), groups=3)[0].float()


def test_per_sample_blur_matches_a_naive_2d_convolution():
    images = torch.rand(2, 3, 20, 24)
    sigma = torch.tensor([0.8, 0.8])
    out = gaussian_blur(images, sigma)
    for i in range(2):
        torch.testing.assert_close(out[i], naive_blur(images[i], 0.8), atol=1e-5, rtol=1e-5)


def test_strong_photometric_identity_range_and_determinism():
    images = torch.rand(4, 3, 16, 16)
    off = AugmentConfig(jitter_prob=0.0, blur_prob=0.0, grayscale_prob=0.0)
    assert torch.equal(strong_photometric(images, torch.Generator().manual_seed(0), off), images)
    a = strong_photometric(images, torch.Generator().manual_seed(1))
    b = strong_photometric(images, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == images.shape and 0 <= a.min() and a.max() <= 1
    assert not torch.equal(a, images)
    gray = strong_photometric(images, torch.Generator().manual_seed(2),
                              AugmentConfig(jitter_prob=0.0, blur_prob=0.0, grayscale_prob=1.0))
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])


def test_cutmix_pastes_boxes_from_the_indexed_sample():
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 12, 12)
    box, index = cutmix_boxes(4, 12, 12, 1.0, torch.Generator().manual_seed(0))
    mixed = apply_cutmix(images, box, index)
    for b in range(4):
        assert (mixed[b][:, box[b]] == index[b]).all() and (mixed[b][:, ~box[b]] == b).all()
        assert box[b].float().mean() <= 0.5 + 1 / 12
    none, _ = cutmix_boxes(4, 12, 12, 0.0, torch.Generator().manual_seed(0))
    assert not none.any()


@pytest.mark.parametrize("kwargs", [dict(crop_size=0), dict(scale_range=(2.0, 1.0)), dict(blur_prob=1.5),
                                    dict(brightness=1.0)])
def test_invalid_config(kwargs):
    with pytest.raises(ValueError):
        AugmentConfig(**kwargs)
