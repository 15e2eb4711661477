"""The model architectures a stage folder can hold: one registered entry per architecture, found by name.

A stage records its model config in ``stage.json`` (``config.model``). Every architecture's config dataclass has an
``architecture`` field naming its entry here, so any reader (``resolve_parent``, ``load_inference_model``,
``distseg flops`` / ``bench infer``) rebuilds the right model from that record alone. Records written before the
field existed have no ``architecture`` key: they are DeepLabV3+ configs (:data:`DEFAULT_ARCHITECTURE`).

Adding an architecture is one module that defines ``ARCHITECTURE = Architecture(...)`` plus one line in
:data:`ARCHITECTURES`; the modules are imported on first use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from distseg.errors import UserError
from distseg.config import ConfigError, from_dict
from distseg.lazy import lazy_entry

ARCHITECTURES: dict[str, str] = {
    "deeplabv3plus": "distseg.models.deeplab",
    "ddpm_unet": "distseg.models.denoiser",
    "ddpm_head": "distseg.models.ddpm_head",
}
"""Architecture name -> the module whose ``ARCHITECTURE`` describes it."""

DEFAULT_ARCHITECTURE = "deeplabv3plus"
"""What a model config without an ``architecture`` key is (every stage folder written before the registry)."""


class InputSizeError(UserError, ValueError):
    """A model cannot take an input of this spatial size (e.g. a UNet whose sides must divide by its stride)."""


@dataclass(frozen=True)
class Architecture:
    """How to rebuild one kind of model from its config."""

    name: str
    """The name recorded as ``architecture`` in the config (and so in stage.json)."""
    config: type
    """The config dataclass; its ``architecture`` field defaults to :attr:`name`."""
    build: Callable[[Any], nn.Module]
    """Builds the model (random or ``pretrained`` weights, as the config says) from a config."""
    segmenter: bool = True
    """``forward(images in [0, 1]) -> logits B×C×H×W`` with a ``num_classes`` config field, so ``evaluate``,
    ``predict`` and ``bench infer`` can run it; False for models that predict something else (a denoiser)."""
    describe: Callable[[Any], str] = lambda cfg: cfg.architecture
    """A short label of a config for tables and benchmark records."""


def architecture_names() -> list[str]:
    """Registered architecture names, without importing their modules."""
    return list(ARCHITECTURES)


def get_architecture(name: str) -> Architecture:
    """The registered architecture ``name``; an unknown name is a config error listing the known ones."""
    return lazy_entry(ARCHITECTURES, name, "ARCHITECTURE", "model architecture", ConfigError)


def architecture_of(cfg: Any) -> Architecture:
    """The entry of a built model config (by its ``architecture`` field)."""
    return get_architecture(cfg.architecture)


def model_config_from_dict(data: dict[str, Any], where: str = "model") -> Any:
    """The config dataclass of whichever architecture ``data`` names (DeepLabV3+ when it names none)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a model config mapping, got {type(data).__name__}")
    name = data.get("architecture", DEFAULT_ARCHITECTURE)
    try:
        arch = get_architecture(name)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return from_dict(arch.config, data, where)


def build_model(cfg: Any) -> nn.Module:
    """Build the model a config of any registered architecture describes."""
    return architecture_of(cfg).build(cfg)


def require_segmenter(cfg: Any, where: str) -> None:
    """Refuse a model that does not map images to class logits (evaluate, predict and bench infer need one)."""
    arch = architecture_of(cfg)
    if not arch.segmenter:
        raise ConfigError(f"{where}: holds a {arch.name} model, which does not predict classes; use a stage that "
                          f"trains a segmenter on it (e.g. ddpm_head on a ddpm stage)")
