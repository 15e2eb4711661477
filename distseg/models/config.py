"""``ModelConfig``: everything needed to rebuild a segmenter from a run folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from distseg.config import apply_overrides, read_mapping
from distseg.models.backbones import BACKBONES, get_spec

PsaLayout = Literal["none", "parallel", "sequential"]
PsaPosition = Literal["pre_aspp", "post_aspp", "decoder"]


@dataclass
class ModelConfig:
    """DeepLabV3+ over a registered timm backbone, optionally with Polarized Self-Attention.

    The defaults are the study's model: HRNetV2-W48 with PSA on the fused stride-4 feature.
    """

    architecture: Literal["deeplabv3plus"] = "deeplabv3plus"
    """The entry of ``distseg.models.architectures`` this config builds (recorded in stage.json)."""
    backbone: str = "hrnet_w48"
    """Key of ``distseg.models.backbones.BACKBONES`` (e.g. ``hrnet_w48``, ``resnet101``, ``xception71``)."""
    num_classes: int = 6
    """Number of output classes (logit channels)."""
    psa: PsaLayout = "parallel"
    """Polarized Self-Attention layout: ``none``, ``parallel`` (x·ch + x·sp) or ``sequential`` (sp(ch(x)))."""
    psa_position: PsaPosition = "pre_aspp"
    """Where PSA sits: on the ASPP input (``pre_aspp``: HRNet's fused stride-4 map, as in the study), on the
    ASPP output (``post_aspp``), or after the decoder convs, before the classifier (``decoder``)."""
    aspp_rates: tuple[int, ...] = (6, 12, 18)
    """Dilation rates of the 3×3 atrous ASPP branches (one branch per rate)."""
    output_stride: int | None = None
    """Stride of the ASPP input for dilatable backbones (8, 16 or 32); None = 16 there, and the native
    stride elsewhere (4 for HRNetV2's fused map). Setting it for a non-dilatable backbone is an error."""
    aspp_channels: int = 256
    """Width of every ASPP branch and of its projection."""
    low_level_channels: int = 48
    """Width the stride-4 skip feature is projected to before the decoder concatenation."""
    decoder_channels: int = 256
    """Width of the two 3×3 decoder convs (the classifier's input)."""
    dropout: float = 0.1
    """Dropout after the ASPP projection (0 disables it)."""
    pretrained: str | None = None
    """Backbone initialisation: None (random), ``imagenet`` (timm hub) or a local PATH to a timm state dict
    (safetensors or torch file)."""
    grad_checkpointing: bool = False
    """Backbone activation checkpointing through timm (trades compute for memory; not all backbones)."""

    def __post_init__(self) -> None:
        if self.architecture != "deeplabv3plus":
            raise ValueError(f"a ModelConfig describes a deeplabv3plus model, not {self.architecture!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone {self.backbone!r} is not registered; choose one of {sorted(BACKBONES)}")
        spec = get_spec(self.backbone)
        for name in ("num_classes", "aspp_channels", "low_level_channels", "decoder_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.aspp_rates = tuple(self.aspp_rates)
        if not self.aspp_rates or any(r < 1 for r in self.aspp_rates):
            raise ValueError(f"aspp_rates must be a non-empty list of positive ints, got {list(self.aspp_rates)}")
        if self.psa not in ("none", "parallel", "sequential"):
            raise ValueError(f"psa must be none, parallel or sequential, got {self.psa!r}")
        if self.psa_position not in ("pre_aspp", "post_aspp", "decoder"):
            raise ValueError(f"psa_position must be pre_aspp, post_aspp or decoder, got {self.psa_position!r}")
        if self.output_stride is not None:
            if not spec.dilatable:
                raise ValueError(f"backbone {self.backbone} cannot be dilated; leave output_stride unset")
            if self.output_stride not in (8, 16, 32):
                raise ValueError(f"output_stride must be 8, 16 or 32, got {self.output_stride}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pretrained == "":
            raise ValueError("pretrained must be null, 'imagenet' or a path, not an empty string")
        if self.grad_checkpointing and not spec.grad_checkpointing:
            raise ValueError(f"timm does not support gradient checkpointing for {self.backbone}")

    def resolved_output_stride(self) -> int | None:
        """The ASPP-input stride handed to timm for dilatable backbones (16 unless set)."""
        if not get_spec(self.backbone).dilatable:
            return None
        return self.output_stride or 16


def load_model_config(path: str | Path | None = None, overrides: list[str] | None = None):
    """The model config of any registered architecture from a YAML/JSON file plus ``key=value`` overrides; no file
    gives the DeepLabV3+ defaults.

    The file may hold the model mapping itself, a mapping with a ``model`` key (a stage config), or a
    ``stage.json`` (``config.model``), so any run folder's config can be profiled as it was trained.
    """
    from distseg.models.architectures import model_config_from_dict

    data: dict = {}
    if path is not None:
        data = read_mapping(path)
        if isinstance(data.get("config"), dict) and "model" in data["config"]:
            data = data["config"]
        if isinstance(data.get("model"), dict):
            data = data["model"]
    return model_config_from_dict(apply_overrides(data, overrides or []), where=str(path or "model"))
