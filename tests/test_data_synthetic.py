"""Synthetic scenes: deterministic, two domains with different class sets, learnable but not trivial."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from distseg.data.classes import ClassMap
from distseg.data.shard import shard_dataset
from distseg.data.synthetic import DOMAINS, make_scene, write_dataset


def test_scenes_are_deterministic_and_well_formed():
    a_img, a_mask = make_scene(np.random.default_rng(5), (48, 64))
    b_img, b_mask = make_scene(np.random.default_rng(5), (48, 64))
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert a_img.shape == (48, 64, 3) and a_img.dtype == np.uint8 and a_mask.shape == (48, 64)
    assert a_mask.dtype == np.uint8 and a_mask.max() < len(DOMAINS["target"].classes)


def test_domains_differ_in_classes_and_appearance():
    assert DOMAINS["target"].classes == ("background", "road", "farmland", "building", "water", "grassland")
    assert len(DOMAINS["intermediate"].classes) == 8
    rng = np.random.default_rng(0)
    masks = [make_scene(rng, 128, "intermediate")[1] for _ in range(4)]
    assert len(np.unique(np.concatenate([m.ravel() for m in masks]))) == 8
    with pytest.raises(ValueError, match="unknown domain"):
        make_scene(rng, 32, "moon")


def smoothed_colours(image: np.ndarray) -> np.ndarray:
    """Per-pixel features: colour after a small blur (texture averaged out)."""
    return np.asarray(Image.fromarray(image).filter(ImageFilter.BoxBlur(2)), dtype=np.float32).reshape(-1, 3)


def test_target_scenes_are_learnable_but_not_trivial():
    rng = np.random.default_rng(1)
    train = [make_scene(rng, 128) for _ in range(12)]
    test = [make_scene(rng, 128) for _ in range(6)]
    n = len(DOMAINS["target"].classes)
    feats = np.concatenate([smoothed_colours(im) for im, _ in train])
    labels = np.concatenate([m.ravel() for _, m in train])
    means = np.stack([feats[labels == c].mean(0) for c in range(n)])
    feats_t = np.concatenate([smoothed_colours(im) for im, _ in test])
    labels_t = np.concatenate([m.ravel() for _, m in test])
    pred = np.argmin(((feats_t[:, None] - means[None]) ** 2).sum(-1), axis=1)
    accuracy = (pred == labels_t).mean()
    majority = np.bincount(labels_t, minlength=n).max() / labels_t.size
    assert accuracy > majority + 0.15  # colour alone is informative ...
    assert accuracy < 0.95  # ... but classes overlap, so a model has to use context


def test_written_dataset_shards_with_colour_masks_and_large_tiles(tmp_path):
    src = write_dataset(tmp_path / "src", 2, 300, domain="intermediate", seed=3, mask_format="color",
                        image_format="jpg", n_unlabeled=1)
    assert ClassMap.from_file(src / "classes.yaml").names == list(DOMAINS["intermediate"].classes)
    manifest = shard_dataset(tmp_path / "out", images=src / "images", masks=src / "masks",
                             classes=src / "classes.yaml", unlabeled=src / "unlabeled", tile=128, split="1:0:0")
    assert manifest["splits"]["train"]["samples"] == 2 * 9 and manifest["splits"]["unlabeled"]["samples"] == 9
