"""DDPM feature extraction and the ddpm_head model, in-process on tiny UNets: hook shapes, noising, seeding, the
frozen extractor, and the errors for bad timesteps, blocks and input sizes."""
from __future__ import annotations

import pytest
import torch

from distseg.models.architectures import InputSizeError
from distseg.models.ddpm_head import DDPMSegmenter, DDPMSegmenterConfig
from distseg.models.denoiser import DenoiserConfig, decoder_layers, to_unet_range
from distseg.models.diffusion_features import DiffusionFeatures, ExtractorConfig
from distseg.models.mlp_head import HeadConfig

TINY_DENOISER = {"image_size": 32, "channels": (16, 32, 32), "layers_per_block": 1, "attention": (False, False, True),
                 "norm_groups": 8, "attention_head_dim": 16}


def _denoiser(**schedule) -> DenoiserConfig:
    from distseg.models.denoiser import NoiseSchedule

    return DenoiserConfig(**TINY_DENOISER, schedule=NoiseSchedule(**schedule))


def _extractor(seed: int = 0, **cfg) -> DiffusionFeatures:
    torch.manual_seed(seed)
    return DiffusionFeatures(_denoiser(timesteps=200), ExtractorConfig(**cfg)).eval()


def _images(b: int = 2, h: int = 32, w: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_decoder_layers_document_the_unet():
    layers = decoder_layers(_denoiser())
    # 3 levels x (layers_per_block + 1) ResNet layers, coarsest first
    assert [(layer.channels, layer.stride, layer.attention) for layer in layers] == \
        [(32, 4, True)] * 2 + [(32, 2, False)] * 2 + [(16, 1, False)] * 2
    assert [layer.index for layer in layers] == list(range(6))


@pytest.mark.parametrize("t", [0, 50, 199])
def test_hooks_return_the_documented_shape_of_every_block(t):
    extractor = _extractor(blocks=tuple(range(6)), timesteps=(t,))
    x = to_unet_range(_images())
    maps = extractor.collect(x, torch.full((2,), t))
    for layer, fmap in zip(decoder_layers(extractor.denoiser), maps):
        assert fmap.shape == (2, layer.channels, 32 // layer.stride, 48 // layer.stride), layer


def test_features_are_the_chosen_layers_upsampled_and_concatenated_t_major():
    blocks, steps = (1, 2, 4), (10, 120)
    both = _extractor(blocks=blocks, timesteps=steps)
    images = _images()
    features = both(images)
    assert features.shape == (2, both.channels, 32, 48) and both.channels == (32 + 32 + 16) * 2
    # t-major: the features of (t0, t1) are those of t0 followed by those of t1
    for i, t in enumerate(steps):
        one = _extractor(blocks=blocks, timesteps=(t,))
        one.unet.load_state_dict(both.unet.state_dict())
        half = features.shape[1] // 2
        torch.testing.assert_close(features[:, i * half:(i + 1) * half], one(images))
    strided = _extractor(blocks=blocks, timesteps=steps, feature_stride=4)
    strided.unet.load_state_dict(both.unet.state_dict())
    assert strided(images).shape == (2, both.channels, 8, 12)


def test_noised_input_follows_the_schedule_and_stopping_early_changes_nothing():
    extractor = _extractor(blocks=(1,), timesteps=(120,))
    images = _images()
    seen = {}
    extractor.unet.register_forward_pre_hook(lambda m, args: seen.update(x_t=args[0].clone()))
    features = extractor(images)
    abar = extractor.scheduler.alphas_cumprod[120]
    noise = extractor.fixed_noise(32, 48, torch.device("cpu"))
    torch.testing.assert_close(seen["x_t"], abar.sqrt() * (2 * images - 1) + (1 - abar).sqrt() * noise)
    # block 1's output from the stopped forward equals that layer's output in a full UNet forward
    full = {}
    plain = DiffusionFeatures(extractor.denoiser, ExtractorConfig(blocks=(5,), timesteps=(120,))).eval()
    plain.unet.load_state_dict(extractor.unet.state_dict())
    plain.unet.up_blocks[0].attentions[1].register_forward_hook(lambda m, i, out: full.setdefault("layer", out))
    plain(images)
    assert "layer" in full
    torch.testing.assert_close(extractor.collect(seen["x_t"], torch.full((2,), 120))[0], full["layer"])
    upsampled = torch.nn.functional.interpolate(full["layer"], size=(32, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(features, upsampled)


def test_same_seed_same_features_and_no_dependence_on_the_batch():
    cfg = {"blocks": (1, 3, 5), "timesteps": (20, 150)}
    a, b = _extractor(seed=0, noise_seed=7, **cfg), _extractor(seed=0, noise_seed=7, **cfg)
    images = _images(b=3)
    torch.testing.assert_close(a(images), b(images), rtol=0, atol=0)
    other = _extractor(seed=0, noise_seed=8, **cfg)
    assert not torch.allclose(a(images), other(images))
    torch.testing.assert_close(a(images[1:2]), a(images)[1:2], rtol=1e-4, atol=1e-5)


def _segmenter(**extractor) -> DDPMSegmenter:
    torch.manual_seed(0)
    cfg = DDPMSegmenterConfig(denoiser=_denoiser(timesteps=200), extractor=ExtractorConfig(**extractor),
                              head=HeadConfig(hidden=16, blocks=2), num_classes=3)
    return DDPMSegmenter(cfg)


def test_frozen_extractor_gets_no_gradients_and_does_not_change():
    model = _segmenter(blocks=(2, 3), timesteps=(10, 100)).train()
    unet_before = {k: v.clone() for k, v in model.features.unet.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # every parameter offered: freezing must hold anyway
    target = torch.randint(0, 3, (2, 32, 48))
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(_images()), target)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None and not p.requires_grad for p in model.features.unet.parameters())
        opt.step()
    assert not model.features.unet.training and model.head.training
    assert all(torch.equal(v, unet_before[k]) for k, v in model.features.unet.state_dict().items())
    assert any(not torch.equal(v, head_before[k]) for k, v in model.head.state_dict().items())
    model.freeze_extractor(False)  # the ablation: gradients reach the UNet
    torch.nn.functional.cross_entropy(model(_images()), target).backward()
    assert all(p.grad is not None for p in model.features.unet.up_blocks[0].parameters())


def test_segmenter_maps_images_to_logits_at_the_input_size():
    model = _segmenter(blocks=(1, 3), timesteps=(5,), feature_stride=2).eval()
    assert model(_images(h=64, w=32)).shape == (2, 3, 64, 32)


def test_bad_timesteps_blocks_and_sizes_are_refused_with_clear_errors():
    denoiser = _denoiser(timesteps=200)
    with pytest.raises(ValueError, match=r"timesteps \[200\] are outside the denoiser's schedule \(t in \[0, 200\)\)"):
        ExtractorConfig(timesteps=(50, 200)).check(denoiser)
    with pytest.raises(ValueError, match=r"blocks \[6\]: unknown decoder block.*has 6 \(0-5"):
        ExtractorConfig(blocks=(1, 6), timesteps=(5,)).check(denoiser)
    with pytest.raises(ValueError, match="distinct"):
        ExtractorConfig(blocks=(1, 1))
    with pytest.raises(InputSizeError, match=r"input 30×32: .* multiples of 4"):
        _extractor(blocks=(1,), timesteps=(5,))(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match="multiples of 4"):
        DenoiserConfig(**{**TINY_DENOISER, "image_size": 30})
