"""Throwaway inputs of a benchmark run: synthetic shards, a parent stage folder, the DeepSpeed config, and the
``StageConfig`` that ties them together. Everything lives in a temporary folder that the run deletes."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

from distseg.bench.config import BenchConfig

_PRECISION_SECTIONS = ("fp16", "bf16", "torch_autocast")


BATCHES_PER_EPOCH = 8


def synthetic_sizes(distinct: int, micro_batch: int, world_size: int, unlabeled_ratio: int) -> tuple[int, int]:
    """(labelled, unlabelled) images so that each rank's train split holds ``BATCHES_PER_EPOCH`` batches.

    A split smaller than one batch per rank would end an epoch every step, and the loader's start-of-epoch latency
    would then dominate data-wait: a tiny dataset's artefact that training on real data does not have.
    """
    labelled = max(distinct, math.ceil(BATCHES_PER_EPOCH * micro_batch * world_size / 0.8))  # 8:1:1 split
    return labelled, labelled * unlabeled_ratio


def _replicate(folder: Path, suffix: str, total: int) -> None:
    """Hard-link (or copy) the files of ``folder`` under new names until it holds ``total`` of them."""
    files = sorted(folder.glob(f"*{suffix}"))
    for i in range(len(files), total):
        src = files[i % len(files)]
        dst = folder / f"{src.stem}_copy{i}{suffix}"
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)


def synthetic_shards(folder: Path, distinct: int, labelled: int, unlabelled: int, size: int) -> Path:
    """``distinct`` procedural scenes of ``size`` px (JPEG, as aerial tiles usually are), repeated up to
    ``labelled`` labelled and ``unlabelled`` unlabelled images, sharded 8:1:1 into ``folder/shards``.

    Repeating is cheap and keeps the loader's real work (reading, decoding, augmenting every sample) intact.
    """
    from distseg.data.shard import shard_dataset
    from distseg.data.synthetic import write_dataset

    from rich.console import Console

    with Console(stderr=True).status(f"generating {distinct} + {distinct} synthetic {size}px scenes"):
        raw = write_dataset(folder / "raw", distinct, size=size, n_unlabeled=distinct, image_format="jpg")
    _replicate(raw / "images", ".jpg", labelled)
    _replicate(raw / "masks", ".png", labelled)
    _replicate(raw / "unlabeled", ".jpg", unlabelled)
    out = folder / "shards"
    shard_dataset(out, images=raw / "images", masks=raw / "masks", unlabeled=raw / "unlabeled",
                  classes=raw / "classes.yaml", split="8:1:1", force=True, progress=True)
    return out


def parent_folder(folder: Path, model_cfg, class_map) -> Path:
    """A finished stage folder with random weights (and an all-ones Fisher, so the distill step runs EWC too).

    Distill and ssl steps need a teacher / start model; its weights do not change the cost of a step.
    """
    import torch

    from distseg.config import to_dict
    from distseg.engine import checkpoint as ckpt
    from distseg.fisher import save_fisher
    from distseg.models import build_model
    from distseg.models.weights import save_weights

    folder.mkdir(parents=True, exist_ok=True)
    mcfg = dataclasses.replace(model_cfg, pretrained=None, num_classes=class_map.num_classes)
    torch.manual_seed(0)
    model = build_model(mcfg)
    save_weights(model, folder / ckpt.WEIGHTS, {"kind": "bench-parent"})
    params = dict(model.named_parameters())
    save_fisher(folder / ckpt.FISHER, {k: torch.ones_like(p) for k, p in params.items()}, params)
    record = ckpt.stage_record("head", {"model": to_dict(mcfg)}, class_map.to_dict(), None)
    record["finished"] = True
    ckpt.write_json_atomic(folder / ckpt.STAGE_JSON, record)
    return folder


def default_ds_config(device_type: str) -> str:
    """The shipped config a GPU node or a CPU machine would train with."""
    return "ds_configs/zero1_bf16.json" if device_type == "cuda" else "ds_configs/cpu_fp32.json"


def with_precision(ds_cfg: dict, precision: str | None) -> dict:
    """``ds_cfg`` with its precision section replaced the way the shipped configs spell each mode.

    bf16 uses torch autocast (the mode that also runs on CPU); fp16 uses DeepSpeed's dynamic loss scaling.
    """
    if precision is None:
        return dict(ds_cfg)
    cfg = {k: v for k, v in ds_cfg.items() if k not in _PRECISION_SECTIONS}
    if precision == "bf16":
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}
    return cfg


def write_ds_config(cfg: BenchConfig, device_type: str, folder: Path) -> Path:
    """Resolve the ds_config file (with the precision override applied) into ``folder/ds_config.json``."""
    from distseg.engine.dsconfig import load_ds_config

    source = cfg.ds_config or default_ds_config(device_type)
    path = folder / "ds_config.json"
    path.write_text(json.dumps(with_precision(load_ds_config(source), cfg.precision), indent=2))
    return path


def stage_config(cfg: BenchConfig, *, shards: str, parent: str, ds_config: str, run_dir: str, micro_batch: int,
                 world_size: int):
    """The ``StageConfig`` of one benchmark step: no accumulation, so one optimizer step = one micro-step.

    Evaluation, checkpoints and the Fisher are off: only the step itself is measured.
    """
    from distseg.data.augment import AugmentConfig
    from distseg.data.stream import StreamConfig
    from distseg.stages.config import DataConfig, StageConfig, TrainConfig
    from distseg.stages.registry import get_kind

    stream = StreamConfig(num_workers=cfg.num_workers, augment=AugmentConfig(crop_size=cfg.size))
    stage = StageConfig(
        kind=cfg.stage, out=run_dir, parent=parent if get_kind(cfg.stage).parent != "none" else None,
        ds_config=ds_config, micro_batch=micro_batch, grad_accum=1, global_batch=micro_batch * world_size,
        data=DataConfig(shards=shards, stream=stream, unlabeled_ratio=cfg.unlabeled_ratio), model=cfg.model,
        train=TrainConfig(steps=cfg.warmup + cfg.steps, log_every=cfg.warmup + cfg.steps, fisher_batches=0))
    if not cfg.stage_set:
        return stage
    from distseg.config import apply_overrides, from_dict, to_dict

    return from_dict(StageConfig, apply_overrides(to_dict(stage), list(cfg.stage_set)), where="stage_set")
