"""Edge-guided masked image modelling: masks follow edges, the loss sees masked pixels only, the stage trains an
encoder that a finetune stage takes as its parent."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import launch, tiny_stage_config
from distseg.ops import masking


def _half_edges(size: int = 64) -> torch.Tensor:
    """A 1×3×size×size image: a fine checkerboard in the left half, flat grey in the right half."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    board = ((yy // 4 + xx // 4) % 2).float()
    image = torch.where(xx < size // 2, board, torch.full_like(board, 0.5))
    return image.expand(3, -1, -1).unsqueeze(0)


def _mask_frequency(edge_weight: float, draws: int = 600, patch: int = 8, ratio: float = 0.5) -> torch.Tensor:
    image = _half_edges().expand(draws, -1, -1, -1)
    density = masking.patch_density(masking.edge_map(image), patch)
    mask = masking.sample_patch_mask(density, ratio, edge_weight, torch.Generator().manual_seed(0))
    assert (mask.flatten(1).sum(1) == round(ratio * mask[0].numel())).all()  # exactly ratio·N patches each time
    return mask.float().mean(0)  # (H/p)×(W/p) frequency of each patch being masked


def test_edge_guided_masks_hit_edge_rich_patches_more_often():
    freq = _mask_frequency(edge_weight=1.0)
    left, right = freq[:, :4].mean(), freq[:, 4:].mean()
    assert left > 0.6 and right < 0.4 and left - right > 0.25, (left, right)


def test_edge_weight_zero_is_uniform_random_masking():
    freq = _mask_frequency(edge_weight=0.0)
    # each of 64 patches is masked with probability 0.5: 600 draws give a standard error of about 0.02
    assert (freq - 0.5).abs().max() < 0.09 and abs(freq[:, :4].mean() - freq[:, 4:].mean()) < 0.03
    probs = masking.masking_probabilities(torch.rand(2, 4, 4), 0.0)
    torch.testing.assert_close(probs, torch.full((2, 16), 1 / 16))


def test_loss_counts_masked_pixels_only_and_is_zero_when_perfect():
    torch.manual_seed(0)
    target, edges = torch.randn(2, 3, 8, 8), torch.rand(2, 1, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4] = 1
    pred = torch.where(mask.bool(), target, torch.randn_like(target) * 100)  # perfect where masked, wrong elsewhere
    assert masking.masked_reconstruction_loss(pred, target, mask, edges, beta=2.0) == 0
    pred = target + 1.0
    naive = sum((1 + 2.0 * edges[b, 0, y, x]) * 1.0 for b in range(2) for y in range(4) for x in range(8) for _ in "rgb")
    weights = sum(3 * (1 + 2.0 * edges[b, 0, y, x]) for b in range(2) for y in range(4) for x in range(8))
    torch.testing.assert_close(masking.masked_reconstruction_loss(pred, target, mask, edges, beta=2.0),
                               torch.tensor(float(naive / weights)))
    l2 = masking.masked_reconstruction_loss(target + 2.0, target, mask, edges, beta=0.0, kind="l2")
    torch.testing.assert_close(l2, torch.tensor(4.0))


def test_patch_targets_are_normalised_per_patch():
    images = torch.rand(2, 3, 16, 16) * 5 + 3
    out = masking.patch_normalised(images, 8)
    patches = torch.nn.functional.unfold(out, 8, stride=8)
    torch.testing.assert_close(patches.mean(1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(patches.std(1, unbiased=False), torch.ones(2, 4), atol=1e-3, rtol=0)


def test_bad_patching_is_refused():
    with pytest.raises(ValueError, match="patch size 24 does not divide the crop 64x64"):
        masking.check_patching((64, 64), 24, 0.5)
    for ratio in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"mask ratio must be in \(0, 1\)"):
            masking.check_patching((64, 64), 16, ratio)


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_mim_stage_learns_and_its_encoder_is_a_finetune_parent(tmp_path, target_shards):
    cfg = tiny_stage_config(tmp_path, steps=40, log_every=5, fisher_batches=0)
    mim = tmp_path / "mim"
    launch("pretrain_mim.py", "--config", str(cfg), "--data", str(target_shards), "--out", str(mim),
           "--set", "optim.lr=0.1", "--set", "mim.patch_size=16", "--set", "mim.figure_tiles=2")
    rec = [m["rec"] for m in _metrics(mim) if "rec" in m]
    assert len(rec) == 8 and sum(rec[-2:]) / 2 < 0.92 * sum(rec[:2]) / 2, rec  # measured: 0.81 -> 0.71
    assert all(m["masked_edge_ratio"] > 1.0 for m in _metrics(mim) if "masked_edge_ratio" in m)
    record = json.loads((mim / "stage.json").read_text())
    assert record["finished"] and record["class_map"] is None and record["unlabeled_samples"] == 16
    weights = load_file(str(mim / "model.safetensors"))
    assert weights and all(k.startswith("backbone.") for k in weights)
    assert (mim / "reconstructions.png").stat().st_size > 1000
    # the encoder becomes the parent of a fine-tune: its backbone starts from the MIM weights
    from distseg.stages.common import build_from, resolve_parent

    parent = resolve_parent(str(mim), None)
    model = build_from(parent, num_classes=6)
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value), key
    launch("finetune.py", "--config", str(cfg), "--data", str(target_shards), "--parent", str(mim),
           "--out", str(tmp_path / "ft"), "--steps", "2")
    assert json.loads((tmp_path / "ft" / "stage.json").read_text())["finished"]
    bad = launch("evaluate.py", str(mim), "--data", str(target_shards), "--no-sliding", check=False)
    assert bad.returncode == 2 and "with no class map (an encoder trained without labels)" in bad.stderr


def test_mim_input_errors(tmp_path, target_shards):
    from distseg.data.shard import shard_dataset
    from distseg.data.synthetic import write_dataset

    cfg = tiny_stage_config(tmp_path, steps=2)
    raw = write_dataset(tmp_path / "raw", 4, size=64, seed=0)
    labelled_only = tmp_path / "labelled"
    shard_dataset(labelled_only, images=raw / "images", masks=raw / "masks", classes=raw / "classes.yaml")
    cases = [(["--data", str(labelled_only)], "no 'unlabeled' split"),
             (["--data", str(target_shards), "--set", "mim.mask_ratio=1.0"], "mask_ratio must be in (0, 1)"),
             (["--data", str(target_shards), "--set", "mim.patch_size=24"], "patch size 24 does not divide")]
    for args, message in cases:
        proc = launch("pretrain_mim.py", "--config", str(cfg), "--out", str(tmp_path / "x"), *args, check=False)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in proc.stderr
        assert not (tmp_path / "x").exists()


def test_swin_tiny_trains_as_a_segmenter_and_as_a_masked_reconstructor():
    """The paper's Swin-T (timm, random init, tiny input): channels-last stages, any crop size, MIM and DeepLabV3+."""
    from distseg.models import ModelConfig, build_model
    from distseg.models.mim import build_reconstructor

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="swin_tiny", num_classes=4, psa="none", aspp_channels=16, low_level_channels=8,
                      decoder_channels=16)
    model = build_model(cfg)
    assert (model.backbone.low_channels, model.backbone.high_channels, model.backbone.high_stride) == (96, 768, 32)
    images = torch.rand(2, 3, 64, 96)  # not a multiple of the 7-token window: timm pads the windows
    logits = model(images)
    assert logits.shape == (2, 4, 64, 96) and torch.isfinite(logits).all()
    recon = build_reconstructor(cfg, width=16)
    edges = masking.edge_map(images)
    density = masking.patch_density(edges, 16)
    mask = masking.pixel_mask(masking.sample_patch_mask(density, 0.6, 0.5), 16)
    target = masking.patch_normalised(images, 16)
    loss = masking.masked_reconstruction_loss(recon(images, mask), target, mask, edges, beta=1.0)
    loss.backward()
    assert torch.isfinite(loss) and recon.mask_token.grad is not None
    assert all(p.grad is not None for p in recon.backbone.parameters() if p.requires_grad)
