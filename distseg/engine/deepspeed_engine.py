"""Build the DeepSpeed engine around the student (the only module that DeepSpeed owns)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from distseg.engine.checkpoint import make_safe_checkpoint_engine
from distseg.engine.distributed import DistEnv
from distseg.engine.dsconfig import (check_device_support, deepspeed_sections, load_ds_config, monitor_sections,
                                     resolve_ds_config, resolve_fast_path)
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

    Returns the engine and the resolved DeepSpeed config, its "auto" precision and layout decided for this device
    (:func:`~distseg.engine.dsconfig.resolve_fast_path`; the student gets that layout here, modules outside the
    engine through :func:`use_memory_format`). Frozen or EMA teachers must stay outside: DeepSpeed would otherwise
    partition, broadcast and checkpoint them as if they were trained. The config's monitor sections are held back:
    they are attached by :func:`attach_monitor` once the stage folder exists.
    """
    import deepspeed

    cfg = resolve_ds_config(load_ds_config(ds_config), env.world_size, micro_batch=micro_batch,
                            grad_accum=grad_accum, global_batch=global_batch, source=ds_config)
    cfg = resolve_fast_path(cfg, env.device.type)
    check_device_support(cfg, env.device.type, source=ds_config)
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters were given to the optimizer")
    optimizer = make_optimizer(params, optim, guard)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(optim.schedule, total_steps, optim.warmup_steps, optim.poly_power))
    use_memory_format(cfg, [model])
    engine, _, _, _ = deepspeed.initialize(model=model.to(env.device), optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_sections(cfg), dist_init_required=False)
    engine.checkpoint_engine = make_safe_checkpoint_engine()
    return engine, cfg


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def channels_last_inputs(module: nn.Module) -> None:
    """Feed ``module`` channels-last images (converted at its entry, on its device); calling it twice is harmless.

    The weights keep the default layout: DeepSpeed broadcasts parameters as byte views and ZeRO packs them into flat
    buffers, both of which need contiguous parameters. A convolution follows its input's layout (cuDNN and oneDNN
    both), so the activations, and the backward, run channels-last from the first layer on.
    """
    if not getattr(module, "_distseg_channels_last", False):
        module.register_forward_pre_hook(_to_channels_last)
        module._distseg_channels_last = True


def use_memory_format(cfg: dict, modules: Iterable[nn.Module]) -> None:
    """Give ``modules`` (the student, and the teachers beside the engine) the resolved config's activation layout."""
    if cfg.get("memory_format") == "channels_last":
        for module in modules:
            channels_last_inputs(module)


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
