"""Weights I/O: round trips, classifier replacement, checked loading, pretrained initialisation."""
from __future__ import annotations

import time

import pytest
import timm
import torch

from distseg.models import ModelConfig, PretrainedWeightsError, WeightsError, build_model
from distseg.models import backbones as backbones_mod
from distseg.models.weights import _timm_key, load_backbone_weights, load_weights, read_metadata, save_weights

SMALL_HEAD = {"aspp_channels": 32, "low_level_channels": 8, "decoder_channels": 32}


def _model(seed: int, **changes) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{"backbone": "test_resnet", "num_classes": 4, **SMALL_HEAD, **changes}))


def _perturb_bn_stats(model: torch.nn.Module) -> None:
    """Give BN non-default running stats, so the round trip checks buffers too."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)


def test_safetensors_round_trip_gives_identical_output(tmp_path):
    source = _model(0)
    _perturb_bn_stats(source)
    save_weights(source, tmp_path / "model.safetensors", {"backbone": "test_resnet", "stage": "distill"})
    target = build_model(source.config)  # same config, different random init
    x = torch.rand(2, 3, 64, 64)
    assert not torch.allclose(source.eval()(x), target.eval()(x))
    report = load_weights(target, tmp_path / "model.safetensors")
    assert report.missing == () and report.unexpected == () and report.skipped_classifier == ()
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    assert read_metadata(tmp_path / "model.safetensors") == {"backbone": "test_resnet", "stage": "distill"}
    assert not (tmp_path / "model.safetensors.tmp").exists()


def test_torch_file_with_container_loads_and_pickles_are_refused(tmp_path):
    source, target = _model(0), _model(1)
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    load_weights(target, tmp_path / "ckpt.pt")
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)
    torch.save({"model": source.state_dict(), "hook": _perturb_bn_stats}, tmp_path / "unsafe.pt")
    with pytest.raises(WeightsError, match="unsafe.pt: cannot read weights"):
        load_weights(target, tmp_path / "unsafe.pt")
    with pytest.raises(WeightsError, match="no such weights file"):
        load_weights(target, tmp_path / "absent.safetensors")


def test_wrapper_prefix_is_stripped():
    source, target = _model(0), _model(1)
    report = load_weights(target, {f"module.{k}": v for k, v in source.state_dict().items()}, strict=True)
    assert report.missing == () and torch.equal(target.classifier.weight, source.classifier.weight)


def test_save_rejects_non_string_metadata(tmp_path):
    with pytest.raises(WeightsError, match="metadata"):
        save_weights(_model(0), tmp_path / "m.safetensors", {"epoch": 3})


def test_replace_classifier_keeps_every_other_weight():
    model = _model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.replace_classifier(9)
    after = model.state_dict()
    assert model.config.num_classes == 9 and after["classifier.weight"].shape == (9, 32, 1, 1)
    assert set(after) == set(before)
    for key in before:
        if not key.startswith("classifier."):
            assert torch.equal(after[key], before[key]), key
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 9, 32, 32)


def test_classifier_mismatch_needs_permission():
    six, four = _model(0, num_classes=6), _model(1)
    with pytest.raises(WeightsError, match=r"classifier\.weight: source \(6, 32, 1, 1\) vs model \(4, 32, 1, 1\)"
                       r".*allow_classifier_mismatch=True"):
        load_weights(four, six.state_dict())
    kept = four.classifier.weight.clone()
    report = load_weights(four, six.state_dict(), allow_classifier_mismatch=True)
    assert report.skipped_classifier == ("classifier.bias", "classifier.weight")
    assert torch.equal(four.classifier.weight, kept)
    torch.testing.assert_close(four.aspp.project[0][0].weight, six.aspp.project[0][0].weight)


def test_shape_mismatch_outside_classifier_is_an_error():
    model = _model(0)
    state = dict(model.state_dict())
    state["decoder.0.0.weight"] = torch.zeros(32, 7, 3, 3)
    with pytest.raises(WeightsError, match=r"decoder\.0\.0\.weight: source \(32, 7, 3, 3\) vs model \(32, 40, 3, 3\)"):
        load_weights(model, state, allow_classifier_mismatch=True)


def test_missing_and_unexpected_keys_are_reported():
    model = _model(0)
    state = dict(_model(1).state_dict())
    state.pop("low_proj.0.weight")
    state["extra.weight"] = torch.zeros(1)
    report = load_weights(model, state)
    assert report.missing == ("low_proj.0.weight",) and report.unexpected == ("extra.weight",)
    torch.testing.assert_close(model.classifier.weight, state["classifier.weight"])
    with pytest.raises(WeightsError, match="missing keys"):
        load_weights(model, state, strict=True)


def test_pretrained_path_accepts_a_plain_timm_state_dict(tmp_path):
    torch.manual_seed(3)
    timm_model = timm.create_model("test_byobnet")  # nested feature names: stages.0 vs stages_0
    torch.save(timm_model.state_dict(), tmp_path / "byob.pth")
    model = build_model(ModelConfig(backbone="test_byobnet", pretrained=str(tmp_path / "byob.pth"), **SMALL_HEAD))
    body = model.backbone.body.state_dict()
    source = timm_model.state_dict()
    for key, value in body.items():
        torch.testing.assert_close(value, source[_timm_key(key)] if key not in source else source[key])
    report = load_backbone_weights(model.backbone, source)
    assert "head.fc.weight" in report.unexpected


def test_pretrained_path_with_missing_backbone_tensors_is_an_error(tmp_path):
    state = timm.create_model("test_resnet").state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(WeightsError, match=r"partial\.safetensors: .* backbone tensors missing, e\.g\. \['layer4"):
        build_model(ModelConfig(backbone="test_resnet", pretrained=str(tmp_path / "partial.safetensors")))


def test_timm_key_unflattens_only_the_first_component():
    assert _timm_key("stages_0.0.conv.weight") == "stages.0.0.conv.weight"
    assert _timm_key("blocks_12.stack.bn_dw.bias") == "blocks.12.stack.bn_dw.bias"
    assert _timm_key("layer1.0.conv1.weight") == "layer1.0.conv1.weight"
    assert _timm_key("conv_stem.weight") == "conv_stem.weight"


@pytest.mark.timeout(60)
def test_offline_imagenet_fails_fast_with_a_clear_error(tmp_path, monkeypatch):
    """No network (probe mocked) and an empty hub cache: one clear error within seconds, no download."""
    from huggingface_hub import constants

    monkeypatch.setattr(backbones_mod, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsError, match=r"test_resnet\.r160_in1k.*pretrained=PATH"):
        build_model(ModelConfig(backbone="test_resnet", pretrained="imagenet"))
    assert time.monotonic() - start < 20
    assert constants.HF_HUB_OFFLINE is False  # offline mode is only switched on for the attempt
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").rglob("*.safetensors"))


def test_failed_hub_download_is_wrapped(monkeypatch):
    """The network looks up but the download itself fails (mocked): same clear error."""
    import timm.models._builder as builder

    def refuse(*args, **kwargs):
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(backbones_mod, "_hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(builder, "load_pretrained", refuse)
    with pytest.raises(PretrainedWeightsError, match="ConnectionError: connection reset by peer.*pretrained=PATH"):
        build_model(ModelConfig(backbone="test_resnet", pretrained="imagenet"))
