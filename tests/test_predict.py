"""Sliding-window core: window geometry, blending weights, equality with whole-image inference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distseg.data.classes import ClassMap
from distseg.inference.sliding import WindowPlan
from distseg.inference.windows import (blend_profile, blend_weights, column_chunks, shard, window_size,
                                       window_starts, windows_in_range)
from distseg.predict import PredictConfig, PredictError, check_model, predict_array


def conv_model(num_classes: int = 4, seed: int = 0) -> torch.nn.Module:
    """A 1×1 convolution: translation-equivariant with a one-pixel receptive field."""
    torch.manual_seed(seed)
    return torch.nn.Conv2d(3, num_classes, 1)


def tiny_class_map(num_classes: int = 4) -> ClassMap:
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (10, 120, 120)]
    return ClassMap.from_dict({"classes": [{"name": f"c{i}", "color": list(colors[i])} for i in range(num_classes)]})


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def whole_image(model: torch.nn.Module, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference: one forward over the full image."""
    with torch.no_grad():
        probs = model(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255).softmax(1)[0]
    conf, labels = probs.max(0)
    return labels.numpy().astype(np.uint8), conf.numpy()


# ---- geometry ------------------------------------------------------------------------------------

@pytest.mark.parametrize("length,size,overlap", [(1000, 128, 32), (128, 128, 0), (129, 128, 0), (50, 64, 16),
                                                 (777, 100, 99)])
def test_window_starts_cover_with_overlap(length, size, overlap):
    starts = window_starts(length, size, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert min(starts[-1] + size, max(length, size)) == max(length, size)  # last window ends at the edge
    covered = np.zeros(length, dtype=int)
    for s in starts:
        covered[s:s + size] += 1
    assert covered.min() >= 1
    for a, b in zip(starts, starts[1:]):
        assert a + size - b >= overlap  # neighbours overlap at least by ``overlap``


def test_window_size_shrinks_for_small_images_to_stride_multiple():
    assert window_size(1000, 512, 32) == 512
    assert window_size(300, 512, 32) == 320
    assert window_size(64, 512, 32) == 64


def test_shard_partitions_exactly():
    items = list(range(23))
    for world in (1, 2, 3, 8):
        shares = [shard(items, r, world) for r in range(world)]
        assert sorted(sum(shares, [])) == items
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError):
        shard(items, 2, 2)


def test_plan_counts_every_window_once_per_chunk_and_rank_shares_add_up():
    cfg = PredictConfig(tile=64, overlap=0.25, chunk_width=128)
    plan = WindowPlan.build(300, 500, cfg)
    chunks = column_chunks(500, 128)
    assert chunks[0] == (0, 128) and chunks[-1][1] == 500
    expected = sum(len(windows_in_range(plan.xs, plan.win_w, *c)) for c in chunks) * len(plan.ys)
    assert plan.num_windows() == expected
    assert sum(plan.num_windows(r, 3) for r in range(3)) == expected


# ---- blending --------------------------------------------------------------------------------------

def test_blend_profile_cross_fades_to_one_in_regular_overlaps():
    size, ramp = 64, 16
    starts = list(range(0, 5 * (size - ramp), size - ramp))
    total = torch.zeros(starts[-1] + size)
    for s in starts:
        total[s:s + size] += blend_profile(size, ramp)
    interior = total[ramp:-ramp]  # every interior pixel: ramps of neighbours sum to exactly 1
    assert torch.allclose(interior, torch.ones_like(interior))
    assert blend_profile(size, ramp).min() > 0 and blend_profile(size, 0).eq(1).all()


def test_blend_weights_are_separable_and_fade_to_the_border():
    w = blend_weights(32, 48, 8, 12)
    assert w.shape == (32, 48)
    assert torch.allclose(w, blend_profile(32, 8)[:, None] * blend_profile(48, 12)[None])
    assert w[16, 24] == 1.0 and w[0, 0] == w.min() > 0


def test_constant_model_is_reproduced_exactly_by_the_weighted_average():
    """Blending divides by the accumulated weight: identical window predictions come out unchanged."""

    class Constant(torch.nn.Module):
        def forward(self, x):
            logits = torch.tensor([0.3, -1.0, 2.0])[None, :, None, None]
            return logits.expand(x.shape[0], 3, *x.shape[2:])

    pred = predict_array(Constant(), random_image(150, 230), 3, PredictConfig(tile=64, overlap=0.4, chunk_width=96))
    expected = torch.tensor([0.3, -1.0, 2.0]).softmax(0).max().item()
    assert (pred.labels == 2).all()
    np.testing.assert_allclose(pred.confidence, expected, rtol=1e-6)


# ---- tiled == whole image ----------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    PredictConfig(tile=64, overlap=0.25, chunk_width=128, batch_size=3),
    PredictConfig(tile=64, overlap=0.0, chunk_width=64, batch_size=1),
    PredictConfig(tile=96, overlap=0.5, chunk_width=4096, tta=True),
    PredictConfig(tile=512),  # image smaller than the tile: one padded window
], ids=["overlap25-chunked", "no-overlap", "overlap50-tta", "single-window"])
def test_tiled_prediction_equals_whole_image_for_translation_equivariant_model(cfg):
    model, image = conv_model(), random_image(181, 299)
    labels, conf = whole_image(model, image)
    pred = predict_array(model, image, 4, cfg)
    assert pred.labels.shape == (181, 299)
    np.testing.assert_array_equal(pred.labels, labels)
    np.testing.assert_allclose(pred.confidence, conf, atol=1e-6)


def test_float_images_in_unit_range_are_accepted():
    model, image = conv_model(), random_image(70, 90)
    pred = predict_array(model, image.astype(np.float32) / 255, 4, PredictConfig(tile=32, chunk_width=64))
    np.testing.assert_array_equal(pred.labels, whole_image(model, image)[0])


def test_bfloat16_forward_stays_close():
    model, image = conv_model(), random_image(64, 64)
    pred = predict_array(model, image, 4, PredictConfig(tile=32, dtype="bfloat16"))
    assert (pred.labels == whole_image(model, image)[0]).mean() > 0.9


def test_nodata_pixels_become_ignore_and_others_are_unchanged():
    model, image = conv_model(), random_image(128, 160)
    valid = np.ones((128, 160), dtype=bool)
    valid[:, :70] = False  # whole windows of nodata are skipped
    valid[100:, 100:] = False
    cfg = PredictConfig(tile=32, overlap=0.25)
    pred = predict_array(model, image, 4, cfg, valid=valid, ignore_index=255)
    labels, conf = whole_image(model, image)
    assert (pred.labels[~valid] == 255).all() and (pred.confidence[~valid] == 0).all()
    np.testing.assert_array_equal(pred.labels[valid], labels[valid])
    np.testing.assert_allclose(pred.confidence[valid], conf[valid], atol=1e-6)


# ---- model / class map agreement --------------------------------------------------------------------

def test_class_count_mismatch_is_reported_before_and_during_prediction():
    with pytest.raises(PredictError, match="class map has 5"):
        check_model(conv_model(4), tiny_class_map(5), torch.device("cpu"))
    with pytest.raises(PredictError, match="expected 5 classes"):
        predict_array(conv_model(4), random_image(40, 40), 5, PredictConfig(tile=32))


def test_model_returning_wrong_size_is_reported():
    class Downsampling(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.avg_pool2d(torch.cat([x, x[:, :1]], 1), 2)

    with pytest.raises(PredictError, match="at the input size"):
        predict_array(Downsampling(), random_image(40, 40), 4, PredictConfig(tile=32))


@pytest.mark.parametrize("kwargs,match", [({"overlap": 0.95}, "overlap"), ({"tile": 8}, "tile"),
                                          ({"chunk_width": 100}, "chunk_width"), ({"dtype": "int8"}, "dtype"),
                                          ({"bands": (1, 2)}, "bands")])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PredictConfig(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_prediction_matches_cpu():
    model, image = conv_model(), random_image(200, 330)
    cfg = PredictConfig(tile=64, overlap=0.25, chunk_width=128, tta=True)
    cpu = predict_array(model, image, 4, cfg)
    gpu = predict_array(conv_model(), image, 4, cfg, device="cuda")
    assert (gpu.labels == cpu.labels).mean() > 0.999
    np.testing.assert_allclose(gpu.confidence, cpu.confidence, atol=1e-4)
    half = predict_array(conv_model(), image, 4, PredictConfig(tile=64, dtype="float16"), device="cuda")
    assert (half.labels == cpu.labels).mean() > 0.99
