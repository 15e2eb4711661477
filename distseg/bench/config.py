"""What a training benchmark runs (``BenchConfig``) and the peak-throughput table MFU is measured against."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from distseg.models import ModelConfig

Precision = Literal["fp32", "bf16", "fp16"]

# Dense tensor-core peaks in TFLOPS, by device-name fragment (first match wins, so specific names come first).
# 'bf16' also serves fp16; 'fp32' is the TF32 tensor-core peak, which fp32 convolutions use by default in PyTorch
# (torch.backends.cudnn.allow_tf32 is on). Figures are the vendors' dense (no sparsity) numbers.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("RTX 4090", {"bf16": 165.2, "fp32": 82.6}),
    ("H100 PCIe", {"bf16": 756.0, "fp32": 378.0}),
    ("H100 NVL", {"bf16": 835.0, "fp32": 417.5}),
    ("H100", {"bf16": 989.0, "fp32": 494.7}),
    ("H200", {"bf16": 989.0, "fp32": 494.7}),
    ("A100", {"bf16": 312.0, "fp32": 156.0}),
)


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The table's peak for a CUDA device name and precision; None when the device is not in the table."""
    for fragment, peaks in PEAK_TFLOPS:
        if fragment.lower() in device_name.lower():
            return peaks["fp32" if precision == "fp32" else "bf16"]
    return None


@dataclass
class BenchConfig:
    """One ``distseg bench train`` run: which stage step, on what data and model, timed how."""

    stage: str = "ssl"
    """The registered stage kind whose real training step is timed (teacher forwards and TTA included)."""
    data: str = ""
    """Shard folder to read ('' = generate a small synthetic dataset in a temporary folder)."""
    ds_config: str = ""
    """DeepSpeed JSON ('' = ds_configs/zero1_bf16.json on CUDA, ds_configs/cpu_fp32.json on CPU)."""
    precision: Precision | None = None
    """Override the ds_config's precision section (None: keep the file's)."""
    micro_batches: tuple[int, ...] = (8,)
    """Micro-batch sizes to sweep (per process, no gradient accumulation); the sweep stops at the first OOM."""
    warmup: int = 5
    """Untimed optimizer steps first (the first one also counts FLOPs; compilation and autotuning happen here)."""
    steps: int = 20
    """Timed optimizer steps."""
    size: int = 512
    """Side of the square training crop in pixels (also the synthetic images' side)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture of the student (and of the teacher for distill/ssl); weights are random."""
    channels_last: bool = False
    """Channels-last images into the student and teachers (cuDNN then runs channels-last kernels)."""
    compile: bool = False
    """``torch.compile`` the student through DeepSpeed (``engine.compile``) after the FLOP-counting step."""
    compile_backend: str = "inductor"
    """torch.compile backend ('inductor' for speed; 'aot_eager' to check the wiring cheaply)."""
    unlabeled_ratio: int = 1
    """(kinds that read labels and a pool) Unlabelled micro-batch = this × the labelled one."""
    num_workers: int = 4
    """Loader worker processes per rank (data-wait depends on it)."""
    synthetic_images: int = 32
    """Distinct synthetic scenes to generate when no --data is given (labelled, and as many unlabelled); they are
    repeated until every rank's epoch holds several batches."""
    stage_set: tuple[str, ...] = ()
    """Overrides of the timed stage's ``StageConfig`` as ``key=value`` (e.g. ``distill.alpha=0`` and
    ``distill.ewc_lambda=0`` for a plain supervised step), applied after the benchmark's own settings."""
    peak_tflops: float | None = None
    """Peak TFLOPS per device for MFU (None: look the device up in ``PEAK_TFLOPS``; unknown or CPU: no MFU)."""
    out_dir: str = "benchmarks/results"
    """Folder whose ``bench.jsonl`` receives one JSON record per run."""
    tag: str = ""
    """Free label stored in the record (``bench scaling`` uses it to group its runs)."""
    device: Literal["cpu", "cuda"] | None = None
    """'cpu' to ignore CUDA even when present (None: CUDA when available)."""

    def __post_init__(self) -> None:
        from distseg.stages.registry import kind_names

        if self.stage not in kind_names():
            raise ValueError(f"stage must be a registered stage kind {kind_names()}, got {self.stage!r}")
        self.micro_batches = tuple(self.micro_batches)
        if not self.micro_batches or min(self.micro_batches) < 1:
            raise ValueError(f"micro_batches must be positive integers, got {list(self.micro_batches)}")
        if self.warmup < 1 or self.steps < 1:
            raise ValueError(f"warmup and steps must be >= 1 (the first warm-up step counts FLOPs), got "
                             f"warmup={self.warmup} steps={self.steps}")
        if self.size < 32:
            raise ValueError(f"size must be >= 32 pixels, got {self.size}")
        if self.unlabeled_ratio < 1 or self.num_workers < 0 or self.synthetic_images < 10:
            raise ValueError("unlabeled_ratio must be >= 1, num_workers >= 0 and synthetic_images >= 10")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be positive, got {self.peak_tflops}")
