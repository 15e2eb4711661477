"""Pieces every stage shares: parents, models, loaders, the run folder and evaluation."""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distseg.config import from_dict, to_dict
from distseg.data.classes import ClassMap
from distseg.engine import checkpoint as ckpt
from distseg.engine.distributed import DistEnv, barrier
from distseg.engine.metrics import ConfusionMatrix
from distseg.models import ModelConfig, build_model
from distseg.models.weights import load_weights


class StageError(ValueError):
    """A stage cannot start: its inputs disagree or are missing. Raised before the run folder is touched."""


@dataclass
class Parent:
    """The model a stage starts from or distils from."""

    model_cfg: ModelConfig
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
        mcfg = from_dict(ModelConfig, record["config"]["model"], where=f"{p / ckpt.STAGE_JSON}:model")
        return Parent(model_cfg=mcfg, weights=p / ckpt.WEIGHTS, class_map=ClassMap.from_dict(record["class_map"]),
                      folder=p)
    if p.is_file():
        return Parent(model_cfg=fallback, weights=p, class_map=None)
    raise StageError(f"{p}: parent stage folder or weights file not found")


def parent_matching(path: str | None, fallback: ModelConfig, class_map: ClassMap, role: str) -> Parent:
    """The parent of a distill or ssl stage, which must already predict ``class_map`` (only head stages may change
    the class set); ``role`` names the parent in the error ("teacher", "start model")."""
    parent = resolve_parent(path, fallback)
    if parent.class_map is not None and parent.class_map != class_map:
        raise StageError(f"{path}: the {role}'s classes {parent.class_map.names} differ from the data's "
                         f"{class_map.names}; run a head stage on this data first")
    if parent.model_cfg.num_classes != class_map.num_classes:
        raise StageError(f"{path}: the {role} predicts {parent.model_cfg.num_classes} classes but the data has "
                         f"{class_map.num_classes}; run a head stage on this data first")
    return parent


def build_from(parent: Parent, num_classes: int | None = None, pretrained: str | None = None) -> nn.Module:
    """Build the parent's architecture and load its weights; ``num_classes`` swaps in a fresh classifier.

    When a new class count is asked for, the parent's classifier may have any shape (it is replaced anyway).
    """
    cfg = dataclasses.replace(parent.model_cfg, pretrained=pretrained if parent.weights is None else None)
    model = build_model(cfg)
    if parent.weights is not None:
        load_weights(model, parent.weights, allow_classifier_mismatch=num_classes is not None)
    if num_classes is not None and num_classes != cfg.num_classes:
        model.replace_classifier(num_classes)
    return model


def frozen(model: nn.Module) -> nn.Module:
    """A teacher: no gradients, eval mode (BN uses running statistics, dropout off)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def data_class_map(shards: str) -> ClassMap:
    if not shards:
        raise StageError("no training data given (data.shards / --data)")
    if not (Path(shards) / "manifest.json").is_file():
        raise StageError(f"{shards}: not a shard folder (no manifest.json); create it with `distseg shard-data`")
    return ClassMap.from_manifest(shards)


def make_loader(shards: str, split: str, stream_cfg, env: DistEnv, *, batch_size: int, train: bool,
                views: tuple[str, ...] = ("weak",), sample_fraction: float | None = None, seed: int = 0):
    """A per-rank loader of ``split`` with the micro-batch size DeepSpeed resolved."""
    from distseg.data.stream import build_loader

    changes: dict[str, Any] = {"batch_size": batch_size, "seed": seed}
    if sample_fraction is not None:
        changes["sample_fraction"] = sample_fraction
    cfg = dataclasses.replace(stream_cfg, **changes)
    return build_loader(shards, split, cfg, rank=env.rank, world_size=env.world_size, train=train, views=views)


@torch.no_grad()
def evaluate_model(model: nn.Module, loader, class_map: ClassMap, env: DistEnv, autocast) -> dict[str, Any]:
    """Whole-tile validation: one confusion matrix over the split, summed across ranks."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(class_map.num_classes, class_map.ignore_index, device=env.device)
    for batch in loader:
        with autocast:
            logits = model(batch["image"].to(env.device, non_blocking=True))
        cm.update(logits.argmax(1), batch["mask"].to(env.device, non_blocking=True))
    cm.all_reduce()
    model.train(was_training)
    result = cm.compute()
    result["class_names"] = class_map.names
    return result


def same_config(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two resolved stage configs describe the same run (the folder's own path may differ: runs move)."""
    return {k: v for k, v in a.items() if k != "out"} == {k: v for k, v in b.items() if k != "out"}


def prepare_folder(out: str, record: dict[str, Any], env: DistEnv, *, resume: bool, force: bool) -> Path:
    """Create (or re-open for --resume) a run folder; refuses to damage an existing run by accident.

    Every rank runs the checks (so all raise together instead of hanging in a barrier); rank 0 alone writes.
    """
    if not out:
        raise StageError("no output folder given (--out)")
    folder = Path(out)
    existing = folder / ckpt.STAGE_JSON
    reopen = resume and existing.is_file()
    if reopen and not same_config(ckpt.read_stage(folder).get("config", {}), record["config"]):
        raise StageError(f"{folder}: --resume with a different config than the run was started with; "
                         f"use a new --out or the original settings")
    if not reopen and folder.exists() and any(folder.iterdir()) and not force:
        hint = "pass --resume to continue it, or --force to start over" if existing.is_file() else \
            "choose another --out or pass --force"
        raise StageError(f"{folder}: exists and is not empty; {hint}")
    barrier()
    if env.is_main:
        if not reopen:
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        if not reopen:
            ckpt.write_json_atomic(existing, record)
    barrier()
    return folder


def resolved_config(cfg, model_cfg: ModelConfig, ds_cfg: dict) -> dict[str, Any]:
    """The config saved in stage.json: the stage config with the model actually built and the final ds_config."""
    data = to_dict(cfg)
    data["model"] = to_dict(model_cfg)
    data["ds_config_resolved"] = ds_cfg
    return data
