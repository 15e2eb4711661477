"""What stage kinds share about models: the parent a stage starts from, and building from it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from distseg.errors import UserError
from distseg.data.classes import ClassMap
from distseg.engine import checkpoint as ckpt
from distseg.models import ModelConfig, build_model, model_config_from_dict
from distseg.models.weights import load_weights


class StageError(UserError, ValueError):
    """A stage cannot start: its inputs disagree or are missing. Raised before the run folder is touched."""


@dataclass
class Parent:
    """The model a stage starts from or distils from."""

    model_cfg: Any
    """The parent's model config, of any registered architecture (``ModelConfig`` for DeepLabV3+)."""
    weights: Path | None
    class_map: ClassMap | None
    folder: Path | None = None

    @property
    def fisher(self) -> Path | None:
        path = self.folder / ckpt.FISHER if self.folder else None
        return path if path and path.is_file() else None


def resolve_parent(path: str | None, fallback: ModelConfig) -> Parent:
    """A stage folder, a bare weights file (architecture from ``fallback``) or nothing (``fallback`` fresh)."""
    if not path:
        return Parent(model_cfg=fallback, weights=None, class_map=None)
    p = Path(path)
    if p.is_dir():
        if not ckpt.is_finished(p):
            raise StageError(f"{p}: parent stage is not finished (no model.safetensors / finished stage.json)")
        record = ckpt.read_stage(p)
        mcfg = model_config_from_dict(record["config"]["model"], where=f"{p / ckpt.STAGE_JSON}:model")
        classes = ClassMap.from_dict(record["class_map"]) if record.get("class_map") else None
        return Parent(model_cfg=mcfg, weights=p / ckpt.WEIGHTS, class_map=classes, folder=p)
    if p.is_file():
        return Parent(model_cfg=fallback, weights=p, class_map=None)
    raise StageError(f"{p}: parent stage folder or weights file not found")


def parent_matching(parent: Parent, class_map: ClassMap, role: str) -> Parent:
    """``parent`` when it already predicts ``class_map`` (only a kind that ``changes_classes`` may change the
    class set); ``role`` names the parent in the error ("teacher", "start model")."""
    deeplab_parent(parent)
    where = parent.folder or parent.weights
    if parent.class_map is not None and parent.class_map != class_map:
        raise StageError(f"{where}: the {role}'s classes {parent.class_map.names} differ from the data's "
                         f"{class_map.names}; run a head stage on this data first")
    if parent.model_cfg.num_classes != class_map.num_classes:
        raise StageError(f"{where}: the {role} predicts {parent.model_cfg.num_classes} classes but the data has "
                         f"{class_map.num_classes}; run a head stage on this data first")
    return parent


def require_start_model(cfg) -> None:
    """A kind that may start from ImageNet needs a parent or ``model.pretrained``: a random start is never meant."""
    if not cfg.parent and cfg.model.pretrained is None:
        raise StageError(f"a {cfg.kind} stage needs a parent (stage folder or weights) or model.pretrained "
                         f"('imagenet' or a PATH); to start from random weights, save them and pass the file")


def start_model(parent: Parent | None, cfg, num_classes: int) -> tuple[nn.Module, ModelConfig]:
    """The model a stage starts from (``parent``, else ``cfg.model`` with ``model.pretrained``) with a classifier
    for ``num_classes``, and the model config to record for it."""
    parent = parent or Parent(model_cfg=cfg.model, weights=None, class_map=None)
    model = build_from(parent, num_classes=num_classes, pretrained=cfg.model.pretrained)
    return model, dataclasses.replace(parent.model_cfg, pretrained=None, num_classes=num_classes)


def build_from(parent: Parent, num_classes: int | None = None, pretrained: str | None = None) -> nn.Module:
    """Build the parent's architecture and load its weights; ``num_classes`` swaps in a fresh classifier.

    When a new class count is asked for, the parent's classifier may have any shape (it is replaced anyway). The
    stage kinds that call this train DeepLabV3+ models, so a parent of another architecture is refused here.
    """
    deeplab_parent(parent)
    cfg = dataclasses.replace(parent.model_cfg, pretrained=pretrained if parent.weights is None else None)
    model = build_model(cfg)
    if parent.weights is not None:
        load_weights(model, parent.weights, allow_classifier_mismatch=num_classes is not None)
    if num_classes is not None and num_classes != cfg.num_classes:
        model.replace_classifier(num_classes)
    return model


def deeplab_parent(parent: Parent) -> None:
    """Refuse a parent that is not a DeepLabV3+ model (e.g. a ddpm or ddpm_head stage) with a clear error."""
    if not isinstance(parent.model_cfg, ModelConfig):
        raise StageError(f"{parent.folder or parent.weights}: the parent is a {parent.model_cfg.architecture} model; "
                         f"this stage trains DeepLabV3+ models (head, distill, ssl and finetune start from one)")
