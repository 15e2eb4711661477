"""Stage folders: exported weights, ``stage.json``, DeepSpeed checkpoints and safe loading.

A stage folder is everything a later stage, ``distseg predict`` or a human needs (see docs/architecture.md).
Nothing here unpickles arbitrary objects: weights are safetensors, and DeepSpeed checkpoints are read with
``torch.load(weights_only=True)`` plus an allow-list of DeepSpeed's plain-data classes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from distseg import __version__

STAGE_JSON = "stage.json"
WEIGHTS = "model.safetensors"
TEACHER_WEIGHTS = "teacher.safetensors"
FISHER = "fisher.safetensors"
COMPLETE = "COMPLETE"


class CheckpointError(RuntimeError):
    """A stage folder or checkpoint is missing, incomplete or corrupt."""


def git_revision() -> str | None:
    """The source revision the run was made with, if distseg runs from a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def read_stage(folder: str | Path) -> dict[str, Any]:
    """Read a stage folder's ``stage.json``; a clear error when the folder is not a stage folder."""
    folder = Path(folder)
    path = folder / STAGE_JSON
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: stage folder not found")
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a stage folder (no {STAGE_JSON})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt stage record: {exc}") from exc


def is_finished(folder: str | Path) -> bool:
    """True when the folder holds a completed stage (exported weights and ``finished`` in stage.json)."""
    try:
        record = read_stage(folder)
    except CheckpointError:
        return False
    return bool(record.get("finished")) and (Path(folder) / WEIGHTS).is_file()


def stage_record(kind: str, config: dict, class_map: dict, parent: str | None, **extra: Any) -> dict[str, Any]:
    """The content of ``stage.json`` (metrics and ``finished`` are filled in as the stage goes)."""
    return {"kind": kind, "config": config, "class_map": class_map, "parent": parent, "git_rev": git_revision(),
            "version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "finished": False,
            "metrics": {}, **extra}


def _safe_globals() -> list:
    """DeepSpeed classes that appear in its optimizer checkpoints and hold only numbers."""
    names = []
    try:
        from deepspeed.runtime.fp16 import loss_scaler

        names += [getattr(loss_scaler, n) for n in ("LossScaler", "DynamicLossScaler") if hasattr(loss_scaler, n)]
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        names.append(fragment_address)
    except ImportError:
        pass
    return names


def make_safe_checkpoint_engine(config_params=None):
    """A DeepSpeed checkpoint engine whose ``load`` never executes pickled code."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(_safe_globals()):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as exc:  # any unpickling or I/O failure means the checkpoint is unusable
                raise CheckpointError(f"{path}: unreadable checkpoint: {exc}") from exc

    return SafeTorchCheckpointEngine(config_params)


def latest_complete_tag(ckpt_dir: Path) -> str | None:
    """The newest checkpoint tag that was completely written (has a COMPLETE marker)."""
    if not ckpt_dir.is_dir():
        return None
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and (p / COMPLETE).is_file())
    return tags[-1] if tags else None


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete tags, and any incomplete tag older than them."""
    tags = sorted(p for p in ckpt_dir.iterdir() if p.is_dir())
    complete = [p for p in tags if (p / COMPLETE).is_file()]
    if len(complete) <= keep:
        return
    cutoff = complete[-keep].name
    for p in tags:
        if p.name < cutoff:
            shutil.rmtree(p, ignore_errors=True)


def load_inference_model(path: str | Path, device: str | torch.device = "cpu", *, model_config: str | None = None,
                         classes: str | None = None, which: str = WEIGHTS):
    """Build a model ready for inference from a stage folder, or from a weights file plus configs.

    Returns ``(model, class_map)``. A stage folder carries its model config (of any registered architecture, named
    by its ``architecture`` key; DeepLabV3+ when absent) and class map in ``stage.json``; a bare weights file needs
    ``model_config`` (a YAML/JSON model config) and ``classes`` (class-map file).
    """
    from distseg.config import read_mapping
    from distseg.data.classes import ClassMap
    from distseg.models import build_model, model_config_from_dict
    from distseg.models.architectures import require_segmenter
    from distseg.models.weights import load_weights

    path = Path(path)
    if path.is_dir():
        record = read_stage(path)
        mcfg = model_config_from_dict(record["config"]["model"], where=f"{path / STAGE_JSON}:model")
        require_segmenter(mcfg, str(path))
        if not record.get("class_map"):
            raise CheckpointError(f"{path}: the stage has no class map (it was trained without labels)")
        class_map = ClassMap.from_dict(record["class_map"])
        weights = path / which
    else:
        if not path.is_file():
            raise CheckpointError(f"{path}: no such weights file or stage folder")
        if model_config is None or classes is None:
            raise CheckpointError(f"{path}: a bare weights file needs --model (model config) and --classes "
                                  f"(class map); a stage folder carries both")
        mcfg = model_config_from_dict(read_mapping(model_config), where=model_config)
        require_segmenter(mcfg, model_config)
        class_map = ClassMap.from_file(classes)
        weights = path
    if mcfg.num_classes != class_map.num_classes:
        raise CheckpointError(f"{path}: model has {mcfg.num_classes} classes but the class map has "
                              f"{class_map.num_classes}")
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights missing (stage not finished?)")
    if hasattr(mcfg, "pretrained"):
        mcfg = dataclasses.replace(mcfg, pretrained=None)
    model = build_model(mcfg)
    load_weights(model, weights)
    return model.to(device).eval(), class_map
