"""Build the DeepSpeed engine around the student (the only module that DeepSpeed owns)."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from distseg.engine.checkpoint import make_safe_checkpoint_engine
from distseg.engine.distributed import DistEnv
from distseg.engine.dsconfig import check_device_support, load_ds_config, resolve_ds_config


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


def make_optimizer(params: list[nn.Parameter], optim) -> torch.optim.Optimizer:
    """The client optimizer named by ``optim.name`` (an ``OptimConfig``)."""
    if optim.name == "adamw":
        return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


def build_engine(model: nn.Module, params: Iterable[nn.Parameter], *, ds_config: str, optim, total_steps: int,
                 env: DistEnv, micro_batch: int | None = None, grad_accum: int | None = None,
                 global_batch: int | None = None) -> tuple[Any, dict]:
    """Wrap ``model`` in a DeepSpeed engine with the client optimizer + poly LR over ``params``.

    Returns the engine and the resolved DeepSpeed config. Frozen or EMA teachers must stay outside: DeepSpeed
    would otherwise partition, broadcast and checkpoint them as if they were trained.
    """
    import deepspeed

    cfg = resolve_ds_config(load_ds_config(ds_config), env.world_size, micro_batch=micro_batch,
                            grad_accum=grad_accum, global_batch=global_batch, source=ds_config)
    check_device_support(cfg, env.device.type, source=ds_config)
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters were given to the optimizer")
    optimizer = make_optimizer(params, optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(optim.schedule, total_steps, optim.warmup_steps, optim.poly_power))
    engine, _, _, _ = deepspeed.initialize(model=model.to(env.device), optimizer=optimizer, lr_scheduler=scheduler,
                                           config=cfg, dist_init_required=False)
    engine.checkpoint_engine = make_safe_checkpoint_engine()
    return engine, cfg


def autocast_context(cfg: dict, device: torch.device):
    """Autocast for modules outside the engine (teachers), matching the engine's precision."""
    from distseg.engine.dsconfig import precision

    mode = precision(cfg)
    if mode == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)
