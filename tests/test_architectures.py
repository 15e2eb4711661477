"""The architecture registry: every stage folder rebuilds its model from stage.json's ``config.model``, old DeepLabV3+
folders (no ``architecture`` key) included."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_MODEL
from distseg.config import ConfigError, from_dict, to_dict
from distseg.engine.checkpoint import CheckpointError, load_inference_model
from distseg.models import ModelConfig, build_model, model_config_from_dict
from distseg.models.architectures import ARCHITECTURES, architecture_names, get_architecture
from distseg.models.weights import save_weights

CLASSES = {"classes": [{"name": n, "value": i} for i, n in enumerate("abc")]}


def _folder(tmp_path, model: dict, class_map=CLASSES, weights_of=None):
    """A finished stage folder holding ``model`` as config.model and the weights of ``weights_of``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    if weights_of is not None:
        save_weights(weights_of, tmp_path / "model.safetensors")
    record = {"kind": "finetune", "finished": True, "class_map": class_map, "config": {"model": model}}
    (tmp_path / "stage.json").write_text(json.dumps(record))
    return tmp_path


def test_every_registered_architecture_loads_and_round_trips_its_default_config():
    assert architecture_names() == list(ARCHITECTURES)
    for name in architecture_names():
        arch = get_architecture(name)
        cfg = arch.config()
        data = to_dict(cfg)
        assert data["architecture"] == name and model_config_from_dict(data) == cfg
        assert arch.describe(cfg)
    with pytest.raises(ConfigError, match=r"stage.json:model: unknown model architecture 'unet3d'; registered"):
        model_config_from_dict({"architecture": "unet3d"}, where="stage.json:model")
    with pytest.raises(ConfigError, match="not one of"):
        from_dict(ModelConfig, {"architecture": "ddpm_head"})


def test_a_deeplab_folder_written_before_the_registry_still_loads(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY_MODEL, num_classes=3)).eval()
    old = dict(TINY_MODEL, num_classes=3)  # no 'architecture' key, as every older stage.json
    loaded, classes = load_inference_model(_folder(tmp_path, old, weights_of=model))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert type(loaded).__name__ == "DeepLabV3Plus" and classes.names == ["a", "b", "c"]


def test_a_ddpm_head_folder_loads_through_the_same_path_and_a_denoiser_is_refused(tmp_path):
    from distseg.models.ddpm_head import DDPMSegmenterConfig
    from distseg.models.denoiser import DenoiserConfig
    from distseg.models.diffusion_features import ExtractorConfig

    denoiser = DenoiserConfig(image_size=32, channels=(16, 32), layers_per_block=1, attention=(False, True),
                              norm_groups=8, attention_head_dim=16)
    cfg = DDPMSegmenterConfig(denoiser=denoiser, extractor=ExtractorConfig(timesteps=(10,), blocks=(0, 3)),
                              num_classes=3)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    loaded, _ = load_inference_model(_folder(tmp_path / "head", to_dict(cfg), weights_of=model))
    x = torch.rand(2, 3, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    unet_folder = _folder(tmp_path / "ddpm", to_dict(denoiser), class_map=None, weights_of=model.features.unet)
    with pytest.raises(ConfigError, match="holds a ddpm_unet model, which does not predict classes"):
        load_inference_model(unet_folder)
    with pytest.raises(CheckpointError, match="no class map"):
        load_inference_model(_folder(tmp_path / "nolabels", to_dict(cfg), class_map=None, weights_of=model))
