"""DeepLabV3+ building: every registry entry, HRNetV2 fusion widths, config validation, head structure."""
from __future__ import annotations

import pytest
import timm
import torch

from distseg.config import ConfigError, from_dict, to_dict
from distseg.models import BACKBONES, ModelConfig, PolarizedSelfAttention, build_model
from distseg.models.config import load_model_config

TINY = sorted(k for k, spec in BACKBONES.items() if spec.tiny)
LARGE = sorted(k for k, spec in BACKBONES.items() if not spec.tiny)
SMALL_HEAD = {"aspp_channels": 32, "low_level_channels": 8, "decoder_channels": 32}


@pytest.mark.parametrize("backbone, psa", [(b, "parallel") for b in TINY] +
                         [("test_resnet", "none"), ("test_resnet", "sequential")])
def test_tiny_entries_forward_backward(backbone, psa):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, num_classes=5, psa=psa, **SMALL_HEAD))
    images = torch.rand(2, 3, 64, 96)
    logits = model(images)
    assert logits.shape == (2, 5, 64, 96)
    assert torch.isfinite(logits).all()
    logits.logsumexp(dim=1).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad


@pytest.mark.parametrize("backbone", LARGE)
def test_large_entries_shapes_on_meta(backbone):
    """Built on the meta device: real timm modules and shapes, no memory, no weights."""
    with torch.device("meta"):
        model = build_model(ModelConfig(backbone=backbone, num_classes=7))
        logits = model(torch.empty(1, 3, 128, 160))
    assert logits.shape == (1, 7, 128, 160)
    assert model.classifier.in_channels == model.config.decoder_channels


def _timm_fused_width(name: str) -> int:
    with torch.device("meta"):
        body = timm.create_model(name, features_only=True, feature_location="", out_indices=(1, 2, 3, 4))
    return sum(body.feature_info.channels())


@pytest.mark.parametrize("backbone, width", [("hrnet_w18_small", 240), ("hrnet_w48", 720)])
def test_hrnet_fused_width_matches_feature_info(backbone, width):
    assert _timm_fused_width(backbone) == width
    with torch.device("meta"):
        model = build_model(ModelConfig(backbone=backbone))
        low, high = model.backbone(torch.empty(1, 3, 256, 256))
    assert model.backbone.high_channels == width and model.backbone.high_stride == 4
    assert high.shape == (1, width, 64, 64) and low.shape[-2:] == (64, 64)
    assert model.aspp.branches[0][0].in_channels == width
    assert isinstance(model.psa, PolarizedSelfAttention) and model.psa.channel.up.out_channels == width


def test_hrnet_fusion_concatenates_upsampled_branches():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="hrnet_w18_small", psa="none", **SMALL_HEAD)).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.backbone.body(x)
        low, high = model.backbone(x)
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    torch.testing.assert_close(high[:, :16], feats[0])
    up = torch.nn.functional.interpolate(feats[3], size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(high[:, -128:], up)
    torch.testing.assert_close(low, feats[0])


@pytest.mark.parametrize("stride, size", [(8, 8), (16, 4), (32, 2)])
def test_output_stride_sets_aspp_input(stride, size):
    with torch.device("meta"):
        model = build_model(ModelConfig(backbone="resnet18", output_stride=stride))
        _, high = model.backbone(torch.empty(1, 3, 64, 64))
    assert high.shape[-1] == size and model.backbone.high_stride == stride


@pytest.mark.parametrize("position, width", [("pre_aspp", 96), ("post_aspp", 32), ("decoder", 32)])
def test_psa_position(position, width):
    model = build_model(ModelConfig(backbone="test_resnet", psa="sequential", psa_position=position, **SMALL_HEAD))
    assert model.psa.channel.up.out_channels == width
    calls = []
    model.psa.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[1]))
    model(torch.rand(1, 3, 64, 64))
    assert calls == [width]


def test_normalisation_buffers_follow_pretrained_cfg_and_stay_out_of_state_dict():
    with torch.device("meta"):
        xception = build_model(ModelConfig(backbone="xception71"))
    assert xception.backbone.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    assert build_model(ModelConfig(backbone="test_resnet", **SMALL_HEAD)).mean.flatten().tolist() == [0.5] * 3
    model = build_model(ModelConfig(backbone="resnet18", **SMALL_HEAD)).eval()
    torch.testing.assert_close(model.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
    assert not {"mean", "std"} & set(model.state_dict())
    x = torch.rand(1, 3, 32, 32)
    normalised = (x - model.mean) / model.std
    with torch.no_grad():
        low, _ = model.backbone(normalised)
        hooked = []
        model.backbone.register_forward_hook(lambda mod, inp, out: hooked.append(out[0]))
        model(x)
    torch.testing.assert_close(hooked[0], low)


def test_parameter_groups_partition_the_model():
    model = build_model(ModelConfig(backbone="test_resnet", **SMALL_HEAD))
    groups = model.parameter_groups()
    ids = {k: {id(p) for p in v} for k, v in groups.items()}
    assert ids["classifier"] == {id(p) for p in model.classifier.parameters()}
    assert ids["backbone"] == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in model.psa.parameters()} <= ids["head"]
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))
    assert not (ids["head"] & ids["backbone"]) and not (ids["head"] & ids["classifier"])


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_model(ModelConfig(backbone="test_resnet", psa="none", dropout=0.0, **SMALL_HEAD))
    ckpt = build_model(ModelConfig(backbone="test_resnet", psa="none", dropout=0.0, grad_checkpointing=True,
                                   **SMALL_HEAD))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 64, 64)
    for model in (plain, ckpt):
        model(x).square().mean().backward()
    assert ckpt.backbone.body.grad_checkpointing
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.mark.parametrize("changes, match", [
    ({"backbone": "resnet202"}, "not registered"),
    ({"backbone": "hrnet_w48", "output_stride": 16}, "cannot be dilated"),
    ({"backbone": "resnet101", "output_stride": 4}, "output_stride"),
    ({"aspp_rates": []}, "aspp_rates"),
    ({"aspp_rates": [6, 0]}, "aspp_rates"),
    ({"num_classes": 0}, "num_classes"),
    ({"psa": "serial"}, "psa"),
    ({"dropout": 1.0}, "dropout"),
    ({"backbone": "hrnet_w18", "grad_checkpointing": True}, "checkpointing"),
])
def test_config_validation(changes, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(ModelConfig, changes)


def test_config_round_trip_and_file_forms(tmp_path):
    cfg = ModelConfig(backbone="resnet101", psa="sequential", aspp_rates=(12, 24, 36), output_stride=8)
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    import json

    (tmp_path / "stage.json").write_text(json.dumps({"kind": "distill", "config": {"model": to_dict(cfg)}}))
    (tmp_path / "m.yaml").write_text("backbone: test_resnet\npsa: none\n")
    assert load_model_config(tmp_path / "stage.json") == cfg
    loaded = load_model_config(tmp_path / "m.yaml", ["num_classes=17", "aspp_rates=[1, 2]"])
    assert (loaded.backbone, loaded.psa, loaded.num_classes, loaded.aspp_rates) == ("test_resnet", "none", 17, (1, 2))
    with pytest.raises(ConfigError, match="unknown key"):
        load_model_config(None, ["backbon=resnet101"])


def test_feature_dropout_perturbs_whole_channels_in_any_mode():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="test_resnet", num_classes=3, psa="none", aspp_channels=16,
                                    low_level_channels=8, decoder_channels=16)).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        clean, again = model(x), model(x, feature_dropout=0.0)
        torch.manual_seed(1)
        perturbed = model(x, feature_dropout=0.5)
    assert torch.equal(clean, again) and not torch.allclose(clean, perturbed)
