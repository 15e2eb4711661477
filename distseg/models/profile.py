"""Model cost: parameters, forward MACs/FLOPs, and inference throughput.

All functions take any ``nn.Module`` and an input size, so they serve segmenters, teachers and
benchmarks alike. FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts a
multiply-add of a convolution or matrix product as 2 FLOPs and ignores element-wise work (norms,
activations, softmax, interpolation); MACs are reported as FLOPs / 2. Counting works on the meta
device, so the cost of a large model can be read without allocating it.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn

Size = int | tuple[int, int]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _hw(size: Size) -> tuple[int, int]:
    """``512`` → ``(512, 512)``; pairs pass through; non-positive sizes are an error."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"input size must be positive, got {size}")
    return int(h), int(w)


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode for the duration (BN uses running stats, dropout is off), then restore."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, size: Size, batch: int = 1, in_chans: int = 3) -> dict[str, float | int]:
    """Forward cost of one batch of ``batch`` images of ``size``, in eval mode on the model's device.

    Returns ``flops`` and ``macs`` for the whole batch (FLOPs = 2 × MACs), their per-image values, and
    the giga versions for printing.
    """
    from torch.utils.flop_counter import FlopCounterMode

    h, w = _hw(size)
    x = torch.zeros(batch, in_chans, h, w, device=_device_of(model))
    with _eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    flops = int(counter.get_total_flops())
    return {"batch": batch, "height": h, "width": w, "flops": flops, "macs": flops // 2,
            "gflops": flops / 1e9, "gmacs": flops / 2e9,
            "gflops_per_image": flops / batch / 1e9, "gmacs_per_image": flops / batch / 2e9}


def forward_flops_per_image(model: nn.Module, size: Size, in_chans: int = 3) -> int:
    """Forward FLOPs (2 × MACs) of one image of ``size``."""
    return int(count_flops(model, size, batch=1, in_chans=in_chans)["flops"])


def _synchronize(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock time covers the work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dtype_name(dtype: str | torch.dtype) -> str:
    """Accept ``torch.bfloat16`` as well as ``"bf16"``, so callers can pass either."""
    if isinstance(dtype, torch.dtype):
        return next((name for name, dt in _DTYPES.items() if dt == dtype), str(dtype))
    return dtype


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Autocast for ``bf16``/``fp16``, nothing for ``fp32``; fp16 is refused on CPU."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if dtype == "fp32":
        return contextlib.nullcontext()
    if dtype == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs CUDA; use bf16 or fp32 on CPU")
    return torch.autocast(device.type, dtype=_DTYPES[dtype])


def _time_batch(model: nn.Module, x: torch.Tensor, warmup: int, iters: int,
                autocast: contextlib.AbstractContextManager) -> float:
    """Seconds for ``iters`` forwards after ``warmup`` untimed ones (which also trigger compilation)."""
    with torch.no_grad(), autocast:
        for _ in range(warmup):
            model(x)
        _synchronize(x.device)
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        _synchronize(x.device)
    return time.perf_counter() - start


def bench_infer(model: nn.Module, size: Size, batch_sizes: Sequence[int] = (1, 8), channels_last: bool = False,
                dtype: str | torch.dtype = "fp32", compile: bool = False, device: str | torch.device = "cpu",
                warmup: int = 3, iters: int = 10, in_chans: int = 3) -> list[dict]:
    """Inference throughput per batch size: one dict per batch with images/s and ms per batch.

    The model is moved to ``device`` (and to channels-last memory if asked) in place and put in eval
    mode. Warm-up forwards run before timing (they absorb cuDNN autotuning and ``torch.compile``), and
    CUDA is synchronised before and after the timed loop.
    """
    device, dtype = torch.device(device), _dtype_name(dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is cuda but CUDA is not available")
    if warmup < 0 or iters < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("need warmup >= 0, iters >= 1 and positive batch sizes")
    autocast = _autocast(device, dtype)
    h, w = _hw(size)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format).eval()
    runner = torch.compile(model) if compile else model
    rows = []
    for batch in batch_sizes:
        x = torch.rand(batch, in_chans, h, w, device=device).contiguous(memory_format=memory_format)
        seconds = _time_batch(runner, x, warmup, iters, autocast)
        rows.append({"batch": batch, "height": h, "width": w, "device": str(device), "dtype": dtype,
                     "channels_last": channels_last, "compile": compile, "warmup": warmup, "iters": iters,
                     "ms_per_batch": 1e3 * seconds / iters, "images_per_s": batch * iters / seconds})
    return rows
