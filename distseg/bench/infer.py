"""``bench infer``: the inference benchmark of ``distseg.models.profile`` recorded in the shape of ``bench train``.

Timing is ``profile.bench_infer`` (warm-up excluded, CUDA synchronised around the timed loop); this module adds the
FLOPs, achieved TFLOPS, MFU, peak memory and provenance, so training and inference rows sit in one report.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from distseg.bench.config import peak_tflops
from distseg.bench.records import append_record, base_record


@dataclasses.dataclass
class InferOptions:
    """How the forward pass is timed."""

    size: int = 512
    """Square input side in pixels."""
    batch: int = 8
    """Images per forward."""
    channels_last: bool = False
    """Channels-last memory format for the model and input."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype (fp16 needs CUDA)."""
    compile: bool = False
    """Run through ``torch.compile`` (compiled during warm-up)."""
    device: str | None = None
    """'cpu', 'cuda' or 'cuda:N' (None: CUDA when available)."""
    warmup: int = 3
    """Untimed forwards."""
    iters: int = 10
    """Timed forwards."""
    peak_tflops: float | None = None
    """Peak TFLOPS of the device for MFU (None: from the peak table; CPU: no MFU)."""
    tag: str = ""
    """Free label stored in the record."""

    def __post_init__(self) -> None:
        if self.size < 1 or self.batch < 1 or self.warmup < 0 or self.iters < 1:
            raise ValueError("size, batch and iters must be >= 1 and warmup >= 0")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be positive, got {self.peak_tflops}")


def run_infer(model_cfg, opts: InferOptions, out_dir: str) -> dict[str, Any]:
    """Time ``opts.iters`` forwards of a random-weight model and append the record to ``out_dir/bench.jsonl``.

    ``model_cfg`` is the config of any registered segmenter architecture (``ModelConfig``, or e.g. a ddpm_head
    stage's ``config.model``).
    """
    import torch

    from distseg.bench.timing import peak_memory_gb, reset_peak_memory
    from distseg.config import to_dict
    from distseg.models import build_model
    from distseg.models.architectures import architecture_of, require_segmenter
    from distseg.models.profile import bench_infer, count_flops

    require_segmenter(model_cfg, "bench infer --model")
    if hasattr(model_cfg, "pretrained"):
        model_cfg = dataclasses.replace(model_cfg, pretrained=None)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {opts.device}: CUDA is not available on this machine")
    with torch.device("meta"):
        flops = count_flops(build_model(model_cfg), opts.size, batch=opts.batch)["flops"]
    reset_peak_memory(device)
    row = bench_infer(build_model(model_cfg), opts.size, [opts.batch], channels_last=opts.channels_last,
                      dtype=opts.precision, compile=opts.compile, device=device, warmup=opts.warmup,
                      iters=opts.iters)[0]
    seconds = row["ms_per_batch"] / 1e3
    tflops = flops / seconds / 1e12
    record = base_record("infer", {"model": to_dict(model_cfg), "options": to_dict(opts)}, device)
    peak = (opts.peak_tflops or peak_tflops(record["device"]["name"], opts.precision)) if device.type == "cuda" \
        else None
    record.update(status="ok", stage="infer", tag=opts.tag, world_size=1, micro_batch=opts.batch,
                  global_batch=opts.batch, precision=opts.precision, size=opts.size,
                  backbone=architecture_of(model_cfg).describe(model_cfg),
                  warmup=opts.warmup, steps=opts.iters, images_per_s=row["images_per_s"],
                  images_per_s_per_gpu=row["images_per_s"],
                  step_time_s={"median": seconds, "p90": None, "mean": seconds},
                  data_wait_fraction=None, peak_memory_gb=[round(peak_memory_gb(device), 3)], flops_per_step=flops,
                  tflops_per_gpu=tflops, tflops_total=tflops, peak_tflops=peak, mfu=tflops / peak if peak else None)
    append_record(out_dir, record)
    return record
