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


def _scenes_digest(domain, seed=3, n=3, size=(64, 80)):
    rng = np.random.default_rng(seed)
    return [make_scene(rng, size, domain) for _ in range(n)]


def test_interpolated_domain_ends_are_the_two_domains():
    from distseg.data.synthetic import interpolate

    for got, want in zip(_scenes_digest(interpolate(1.0)), _scenes_digest("intermediate")):
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    start = interpolate(0.0)
    target = DOMAINS["target"]
    assert start.classes == DOMAINS["intermediate"].classes
    assert all(start.colors[c] == target.colors[c] for c in target.classes)
    assert (start.texture, start.scale, start.crop_hues) == (target.texture, target.scale, target.crop_hues)
    masks = np.concatenate([m.ravel() for _, m in _scenes_digest(start, n=6)])
    assert masks.max() < len(target.classes)  # forest and bare soil are in the map but never drawn at t = 0
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        interpolate(1.5)


def test_distance_knob_moves_palette_texture_scale_and_classes_monotonically():
    from distseg.data.synthetic import interpolate

    steps = [interpolate(t) for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    target = np.array([DOMAINS["target"].colors[c] for c in DOMAINS["target"].classes], dtype=float)
    palette_gap = [np.abs(np.array([d.colors[c] for c in DOMAINS["target"].classes]) - target).sum() for d in steps]
    assert palette_gap == sorted(palette_gap) and palette_gap[0] == 0
    assert [d.texture for d in steps] == sorted(d.texture for d in steps)
    assert [d.scale for d in steps] == sorted(d.scale for d in steps)
    novel = [np.isin(np.concatenate([m.ravel() for _, m in _scenes_digest(d, n=16, size=128)]), [6, 7]).mean()
             for d in steps]  # forest + bare soil share: 0, 4, 10, 18, 18 % with this seed
    assert novel[0] == 0 and novel[-1] > 0.05 and novel == sorted(novel)


def test_write_dataset_takes_an_interpolated_domain(tmp_path):
    from distseg.data.synthetic import interpolate

    src = write_dataset(tmp_path / "mid", 2, 64, domain=interpolate(0.5), seed=0, mask_format="color")
    cmap = ClassMap.from_file(src / "classes.yaml")
    assert cmap.names == list(DOMAINS["intermediate"].classes) and len(set(cmap.colors)) == 8
