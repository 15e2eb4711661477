"""DeepSpeed config files: loading, CLI overrides, batch arithmetic and the per-device fast path.

``train_batch_size = micro-batch × gradient accumulation × world size`` must hold exactly; DeepSpeed's own error
for a mismatch is cryptic, so it is checked here first with the three numbers in the message.

A config may leave the precision and the activation layout to the machine: ``"torch_autocast": {"enabled": "auto"}``
and ``"memory_format": "auto"``. :func:`resolve_fast_path` decides them from the device (and, on CPU, from the
instruction sets the kernel reports), and writes the decision into the resolved config that stage.json keeps.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distseg.config import ConfigError, read_mapping

_KNOWN_SECTIONS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "zero_optimization",
    "zero_allow_untested_optimizer", "fp16", "bf16", "torch_autocast", "gradient_clipping", "steps_per_print",
    "wall_clock_breakdown", "communication_data_type", "prescale_gradients", "checkpoint", "comms_logger",
    "flops_profiler", "activation_checkpointing", "dump_state", "memory_breakdown", "tensorboard", "csv_monitor",
    "wandb", "comet", "memory_format", "fast_path",
}
DISTSEG_SECTIONS = ("memory_format", "fast_path")
"""Sections distseg reads itself and DeepSpeed never sees: the activation layout and the recorded fast-path choice."""
AUTO = "auto"
MEMORY_FORMATS = ("contiguous", "channels_last", AUTO)
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""/proc/cpuinfo flags of CPUs with native bf16 matrix instructions: there bf16 autocast and channels-last
activations are the fast path (oneDNN); elsewhere bf16 is emulated and slower than fp32."""
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
    enabled = cfg.get("torch_autocast", {}).get("enabled", False)
    if not isinstance(enabled, bool) and enabled != AUTO:
        raise ConfigError(f"{path}: torch_autocast.enabled must be true, false or \"auto\", got {enabled!r}")
    if cfg.get("memory_format", "contiguous") not in MEMORY_FORMATS:
        raise ConfigError(f"{path}: memory_format must be one of {list(MEMORY_FORMATS)}, got {cfg['memory_format']!r}")
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


def deepspeed_sections(cfg: dict[str, Any]) -> dict[str, Any]:
    """What ``deepspeed.initialize`` is given: the training sections less those distseg applies itself."""
    return {k: v for k, v in training_sections(cfg).items() if k not in DISTSEG_SECTIONS}


@dataclass(frozen=True)
class FastPath:
    """The fastest exact-enough way to run a model on one device."""

    bf16: bool
    """bf16 autocast (weights, optimizer state and reductions stay fp32)."""
    channels_last: bool
    """Channels-last activations (convolutions then use oneDNN's NHWC kernels on CPU)."""
    reason: str
    """Why, in words, for stage.json."""


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (the first processor of /proc/cpuinfo); empty when unreadable (not
    Linux), which :func:`fast_path` reads as "no native bf16"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def fast_path(device_type: str, flags: frozenset[str] | set[str]) -> FastPath:
    """The decision table. CUDA: bf16 autocast, layout unchanged (the GPU path). CPU with AMX or AVX512-BF16:
    bf16 autocast and channels-last (oneDNN's native bf16 kernels). Any other CPU: fp32, contiguous (bf16 is
    emulated there, and channels-last was measured no faster than contiguous on an AVX2 CPU: docs/bench.md)."""
    if device_type == "cuda":
        return FastPath(True, False, "cuda: bf16 autocast")
    native = sorted(set(BF16_CPU_FLAGS) & set(flags))
    if native:
        return FastPath(True, True, f"cpu with {'+'.join(native)}: bf16 autocast, channels-last")
    return FastPath(False, False, "cpu without amx_bf16/avx512_bf16: fp32, contiguous")


def resolve_fast_path(cfg: dict[str, Any], device_type: str, flags: frozenset[str] | None = None) -> dict[str, Any]:
    """``cfg`` with every ``"auto"`` (``torch_autocast.enabled``, ``memory_format``) replaced by :func:`fast_path`'s
    choice for this device, and the choice recorded under ``fast_path``; a config without "auto" is returned as is.
    ``flags`` defaults to this machine's (:func:`cpu_flags`)."""
    autocast = cfg.get("torch_autocast", {})
    auto_precision, auto_layout = autocast.get("enabled") == AUTO, cfg.get("memory_format") == AUTO
    if not (auto_precision or auto_layout):
        return cfg
    path = fast_path(device_type, cpu_flags() if flags is None else flags)
    cfg = copy.deepcopy(cfg)
    if auto_precision:
        cfg["torch_autocast"] = {**autocast, "enabled": path.bf16, "dtype": autocast.get("dtype", "bfloat16")}
    if auto_layout:
        cfg["memory_format"] = "channels_last" if path.channels_last else "contiguous"
    cfg["fast_path"] = path.reason
    return cfg


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
    """The precision mode a config asks for: 'fp16', 'bf16' (autocast or DeepSpeed bf16), 'fp32', or 'auto' while
    :func:`resolve_fast_path` has not decided it for a device."""
    if cfg.get("fp16", {}).get("enabled"):
        return "fp16"
    autocast = cfg.get("torch_autocast", {})
    if autocast.get("enabled") == AUTO:
        return AUTO
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
