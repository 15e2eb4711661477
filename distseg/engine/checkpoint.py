"""Stage folders: exported weights, ``stage.json``, DeepSpeed checkpoints and safe loading.

A stage folder is everything a later stage, ``distseg predict`` or a human needs (see docs/architecture.md).
Nothing here unpickles arbitrary objects: weights are safetensors, and DeepSpeed checkpoints are read with
``torch.load(weights_only=True)`` plus an allow-list of DeepSpeed's plain-data classes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from distseg.errors import UserError
from distseg import __version__

STAGE_JSON = "stage.json"
WEIGHTS = "model.safetensors"
TEACHER_WEIGHTS = "teacher.safetensors"
FISHER = "fisher.safetensors"
COMPLETE = "COMPLETE"


class CheckpointError(UserError, RuntimeError):
    """A stage folder or checkpoint is missing, incomplete or corrupt."""


def git_revision() -> str | None:
    """The source revision the run was made with, if distseg runs from a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON atomically (:func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=2))


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


_PLAIN_CLASSES = {
    "deepspeed.runtime.fp16.loss_scaler": ("LossScaler", "DynamicLossScaler"),
    "deepspeed.utils.tensor_fragment": ("fragment_address",),
    "deepspeed.runtime.zero.config": ("ZeroStageEnum",),
}
"""DeepSpeed classes found in its checkpoints that hold only numbers (loss scalers, an enum of the ZeRO stage,
parameter fragment addresses): ZeRO >= 1 optimizer files pickle all of them."""


def _safe_globals() -> list:
    """The importable classes of :data:`_PLAIN_CLASSES` (a DeepSpeed version may lack some)."""
    import importlib

    found = []
    for module, names in _PLAIN_CLASSES.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(mod, name) for name in names if hasattr(mod, name)]
    return found


def safe_load(path: str | Path, map_location=None) -> Any:
    """``torch.load`` that can never run pickled code: tensors, containers and the allow-listed plain classes."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def make_safe_checkpoint_engine(config_params=None):
    """A DeepSpeed checkpoint engine whose ``load`` never executes pickled code."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                return safe_load(path, map_location)
            except Exception as exc:  # any unpickling or I/O failure means the checkpoint is unusable
                raise CheckpointError(f"{path}: unreadable checkpoint: {_first_line(exc)}") from exc

    return SafeTorchCheckpointEngine(config_params)


def _first_line(exc: BaseException) -> str:
    """An exception as one short line (torch's unpickling errors run to many lines of advice)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


_RANKED = re.compile(r"(?:zero_pp_rank_|rng_rank)(\d+)")
"""Checkpoint files that belong to one data-parallel rank (its ZeRO optimizer partition, its RNG state)."""


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Checkpoint tags that were completely written (have a COMPLETE marker), newest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and (p / COMPLETE).is_file()), reverse=True)


def tag_problem(tag_dir: Path, rank: int) -> str | None:
    """Why ``rank`` cannot resume from ``tag_dir``, or None when every file it will read loads.

    A resume reads the shared files and this rank's own ones; each is loaded here first (torch files with the safe
    loader, safetensors fully), so a truncated or garbled file sends every rank to an older tag together instead
    of failing one rank inside DeepSpeed's load. Bit flips inside tensor data are not detectable this way.
    """
    from safetensors.torch import load_file

    if not (tag_dir / f"rng_rank{rank}.pt").is_file():
        return f"{tag_dir}: rng_rank{rank}.pt is missing"
    for path in sorted(tag_dir.iterdir()):
        owner = _RANKED.match(path.name)
        if owner and int(owner.group(1)) != rank:
            continue
        try:
            if path.suffix == ".pt":
                safe_load(path, map_location="cpu")
            elif path.suffix == ".safetensors":
                load_file(str(path))
        except Exception as exc:  # unreadable in any way: this tag cannot be resumed from
            return f"{path}: unreadable ({_first_line(exc)})"
    return None


def mark_unusable(tag_dir: Path, problem: str) -> None:
    """Retire a damaged tag: its COMPLETE marker becomes UNUSABLE (with the reason), so no resume picks it again."""
    (tag_dir / "UNUSABLE").write_text(problem + "\n")
    (tag_dir / COMPLETE).unlink(missing_ok=True)


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
        if record.get("class_map") is None:
            raise CheckpointError(f"{path}: a {record.get('kind')!r} stage with no class map (an encoder trained "
                                  f"without labels); run a head or finetune stage on it (as its parent) before "
                                  f"evaluating or predicting")
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
