"""DeepSpeed config files: loading, CLI overrides and batch arithmetic.

``train_batch_size = micro-batch × gradient accumulation × world size`` must hold exactly; DeepSpeed's own error
for a mismatch is cryptic, so it is checked here first with the three numbers in the message.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from distseg.config import ConfigError, read_mapping

_KNOWN_SECTIONS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "zero_optimization",
    "zero_allow_untested_optimizer", "fp16", "bf16", "torch_autocast", "gradient_clipping", "steps_per_print",
    "wall_clock_breakdown", "communication_data_type", "prescale_gradients", "checkpoint", "comms_logger",
    "flops_profiler", "activation_checkpointing", "dump_state", "memory_breakdown", "tensorboard", "csv_monitor",
    "wandb", "comet",
}
MONITOR_SECTIONS = ("tensorboard", "csv_monitor", "wandb", "comet")
"""DeepSpeed's monitor sections: where scalars go, not how the model trains (so never part of a run's identity)."""


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """Read a ds_config JSON file; errors name the file.

    A relative path that does not exist from the working directory is looked up among the configs shipped inside
    the package, so ``ds_configs/zero1_bf16.json`` (or just ``zero1_bf16.json``) works from any directory and after
    a non-editable install.
    """
    from distseg.resources import shipped

    path = Path(path)
    if not path.is_file() and not path.is_absolute():
        path = shipped("ds_configs", path) or path
    if not path.is_file():
        raise ConfigError(f"{path}: DeepSpeed config not found")
    cfg = read_mapping(path)
    unknown = sorted(set(cfg) - _KNOWN_SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: unknown DeepSpeed section(s) {unknown}")
    return cfg


def resolve_ds_config(cfg: dict[str, Any], world_size: int, *, micro_batch: int | None = None,
                      grad_accum: int | None = None, global_batch: int | None = None,
                      source: str = "ds_config") -> dict[str, Any]:
    """Merge CLI overrides into ``cfg`` and fill in the batch triple consistently for ``world_size`` ranks."""
    cfg = copy.deepcopy(cfg)
    tbs = global_batch if global_batch is not None else cfg.get("train_batch_size")
    micro = micro_batch if micro_batch is not None else cfg.get("train_micro_batch_size_per_gpu")
    accum = grad_accum if grad_accum is not None else cfg.get("gradient_accumulation_steps")
    if micro is None and tbs is not None and accum is not None:
        micro, rem = divmod(tbs, accum * world_size)
        if rem or micro < 1:
            raise ConfigError(f"{source}: global batch {tbs} is not divisible by gradient accumulation {accum} × "
                              f"world size {world_size}")
    if micro is None and tbs is not None:
        accum = accum or 1  # neither given: no accumulation, the global batch split over the ranks
        micro, rem = divmod(tbs, accum * world_size)
        if rem or micro < 1:
            raise ConfigError(f"{source}: global batch {tbs} is not divisible by world size {world_size}; "
                              f"set --micro-batch and --grad-accum, or change train_batch_size")
    micro = micro or 1
    if tbs is None:
        tbs = micro * (accum or 1) * world_size
    if accum is None:
        accum, rem = divmod(tbs, micro * world_size)
        if rem or accum < 1:
            raise ConfigError(
                f"{source}: global batch {tbs} cannot be split into micro-batches of {micro} on {world_size} "
                f"rank(s) (micro × world = {micro * world_size}); pick --micro-batch dividing {tbs // world_size or 1} "
                f"or change train_batch_size")
    if micro * accum * world_size != tbs:
        raise ConfigError(f"{source}: train_batch_size {tbs} != micro-batch {micro} × gradient accumulation {accum} "
                          f"× world size {world_size} (= {micro * accum * world_size})")
    cfg.update(train_batch_size=tbs, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    zero = cfg.get("zero_optimization", {}).get("stage", 0)
    if zero >= 3:
        raise ConfigError(f"{source}: ZeRO stage 3 is not supported: the EMA/frozen teachers read the student's full "
                          f"parameters every step; use stage 0-2 (the models fit on one GPU)")
    if zero >= 1:
        cfg["zero_allow_untested_optimizer"] = True
    if cfg.get("fp16", {}).get("enabled") and cfg.get("bf16", {}).get("enabled"):
        raise ConfigError(f"{source}: fp16 and bf16 cannot both be enabled")
    return cfg


def training_sections(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config without its monitor sections: what decides the numbers a run produces."""
    return {k: v for k, v in cfg.items() if k not in MONITOR_SECTIONS}


def monitor_sections(cfg: dict[str, Any], folder: Path, tensorboard_default: bool) -> dict[str, Any]:
    """The monitor sections of a stage writing into ``folder``: those the config gives, with their output paths
    defaulting to the stage folder, plus TensorBoard when ``tensorboard_default`` and the config says nothing.

    DeepSpeed writes to ``output_path/job_name``; the defaults make that ``<stage>/tensorboard`` and ``<stage>/csv``.
    """
    sections = {k: copy.deepcopy(cfg[k]) for k in MONITOR_SECTIONS if k in cfg}
    if tensorboard_default and "tensorboard" not in sections:
        sections["tensorboard"] = {"enabled": True}
    for name, job in (("tensorboard", "tensorboard"), ("csv_monitor", "csv")):
        if name in sections:
            sections[name].setdefault("output_path", str(folder))
            sections[name].setdefault("job_name", job)
    return sections


def precision(cfg: dict[str, Any]) -> str:
    """The precision mode a resolved config asks for: 'fp16', 'bf16' (autocast or DeepSpeed bf16) or 'fp32'."""
    if cfg.get("fp16", {}).get("enabled"):
        return "fp16"
    autocast = cfg.get("torch_autocast", {})
    if cfg.get("bf16", {}).get("enabled") or (autocast.get("enabled") and "bf" in str(autocast.get("dtype", "bf"))):
        return "bf16"
    return "fp32"


def check_device_support(cfg: dict[str, Any], device_type: str, source: str = "ds_config") -> None:
    """Refuse modes that cannot run on this device, before DeepSpeed fails deep inside."""
    if device_type != "cuda":
        if cfg.get("fp16", {}).get("enabled"):
            raise ConfigError(f"{source}: fp16 with loss scaling needs a CUDA device; use a bf16 (torch_autocast) "
                              f"or fp32 config on CPU")
        if cfg.get("bf16", {}).get("enabled"):
            raise ConfigError(f"{source}: DeepSpeed 'bf16' keeps BN buffers in fp32 and fails on CPU; use the "
                              f"'torch_autocast' section with dtype bfloat16 instead")
