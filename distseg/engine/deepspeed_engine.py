"""Build the DeepSpeed engine around the student (the only module that DeepSpeed owns)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from distseg.engine.checkpoint import make_safe_checkpoint_engine
from distseg.engine.distributed import DistEnv
from distseg.engine.dsconfig import (check_device_support, load_ds_config, monitor_sections, resolve_ds_config,
                                     training_sections)
from distseg.engine.finite import StepGuard, guarded


def lr_lambda(schedule: str, total_steps: int, warmup: int, power: float):
    """Multiplier of the base lr at optimizer step t: linear warm-up, then poly decay (or constant)."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return max(0.0, 1.0 - progress) ** power

    return factor


def make_optimizer(params: list[nn.Parameter], optim, guard: StepGuard | None = None) -> torch.optim.Optimizer:
    """The client optimizer named by ``optim.name`` (an ``OptimConfig``); with a ``guard``, a step with a
    non-finite loss or gradient is skipped on every rank (:mod:`distseg.engine.finite`)."""
    if optim.name == "adamw":
        optimizer = guarded(torch.optim.AdamW)(params, lr=optim.lr, weight_decay=optim.weight_decay)
    else:
        optimizer = guarded(torch.optim.SGD)(params, lr=optim.lr, momentum=optim.momentum,
                                             weight_decay=optim.weight_decay)
    optimizer.guard = guard
    return optimizer


def build_engine(model: nn.Module, params: Iterable[nn.Parameter], *, ds_config: str, optim, total_steps: int,
                 env: DistEnv, micro_batch: int | None = None, grad_accum: int | None = None,
                 global_batch: int | None = None, guard: StepGuard | None = None) -> tuple[Any, dict]:
    """Wrap ``model`` in a DeepSpeed engine with the client optimizer + poly LR over ``params``.

    Returns the engine and the resolved DeepSpeed config. Frozen or EMA teachers must stay outside: DeepSpeed
    would otherwise partition, broadcast and checkpoint them as if they were trained. The config's monitor sections
    are held back: they are attached by :func:`attach_monitor` once the stage folder exists.
    """
    import deepspeed

    cfg = resolve_ds_config(load_ds_config(ds_config), env.world_size, micro_batch=micro_batch,
                            grad_accum=grad_accum, global_batch=global_batch, source=ds_config)
    check_device_support(cfg, env.device.type, source=ds_config)
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters were given to the optimizer")
    optimizer = make_optimizer(params, optim, guard)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(optim.schedule, total_steps, optim.warmup_steps, optim.poly_power))
    engine, _, _, _ = deepspeed.initialize(model=model.to(env.device), optimizer=optimizer, lr_scheduler=scheduler,
                                           config=training_sections(cfg), dist_init_required=False)
    engine.checkpoint_engine = make_safe_checkpoint_engine()
    return engine, cfg


def tensorboard_available() -> bool:
    """Whether DeepSpeed's TensorBoard monitor can run here (it writes through ``torch.utils.tensorboard``)."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def attach_monitor(engine, cfg: dict, folder: Path) -> None:
    """Give the engine DeepSpeed's monitor for the config's ``tensorboard`` / ``csv_monitor`` / ``wandb`` sections,
    writing into the stage folder; TensorBoard is on by default when it is installed. Rank 0 writes.

    Built only now, after the folder is prepared, so a refused run writes nothing and a restart does not delete a
    writer's open files. DeepSpeed then adds its own per-step events (``Train/Samples/lr``, fp16 loss scale).
    """
    from deepspeed.monitor.config import get_monitor_config
    from deepspeed.monitor.monitor import MonitorMaster

    sections = monitor_sections(cfg, folder, tensorboard_default=tensorboard_available())
    engine.monitor = MonitorMaster(get_monitor_config(sections))


def autocast_context(cfg: dict, device: torch.device):
    """Autocast for modules outside the engine (teachers), matching the engine's precision."""
    from distseg.engine.dsconfig import precision

    mode = precision(cfg)
    if mode == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)
