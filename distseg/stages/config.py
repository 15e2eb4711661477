"""Typed configs of a training stage; the resolved config is saved in every stage folder's ``stage.json``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from distseg.data.stream import StreamConfig
from distseg.losses import SupervisedLossConfig
from distseg.models import ModelConfig


@dataclass
class OptimConfig:
    """The client optimizer with a poly schedule (the study's SGD settings are the defaults)."""

    name: Literal["sgd", "adamw"] = "sgd"
    """'sgd' (momentum, the study's) or 'adamw' (decoupled weight decay; converges in fewer steps when
    fine-tuning a pretrained encoder on a CPU budget)."""
    lr: float = 1e-3
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum (AdamW uses its default betas)."""
    weight_decay: float = 1e-3
    schedule: Literal["poly", "constant"] = "poly"
    """'poly': lr·(1 − t/T)^power after warm-up; 'constant': lr after warm-up."""
    poly_power: float = 0.9
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimizer steps."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.momentum < 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0; momentum, weight_decay and warmup_steps >= 0")


@dataclass
class TrainConfig:
    """Length of a stage and how often it logs, evaluates and checkpoints (all in optimizer steps)."""

    steps: int = 1000
    """Optimizer steps (each = gradient-accumulation micro-steps × world size × micro-batch images)."""
    log_every: int = 10
    """Loss values are read from the device (one host sync) every this many steps."""
    eval_every: int = 0
    """Validate every N steps (0: only at the end). The stage always validates at the end."""
    ckpt_every: int = 0
    """DeepSpeed checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    seed: int = 0
    eval_batch_size: int = 4
    fisher_batches: int = 16
    """Batches of this stage's training data used for the diagonal Fisher saved at the end (0: skip)."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if min(self.log_every, self.keep_checkpoints, self.eval_batch_size) < 1:
            raise ValueError("log_every, keep_checkpoints and eval_batch_size must be >= 1")
        if min(self.eval_every, self.ckpt_every, self.fisher_batches) < 0:
            raise ValueError("eval_every, ckpt_every and fisher_batches must be >= 0")


@dataclass
class DataConfig:
    """Which shards a stage reads."""

    shards: str = ""
    """Shard folder written by ``distseg shard-data`` (holds manifest.json)."""
    train_split: str = "train"
    val_split: str = "val"
    stream: StreamConfig = field(default_factory=StreamConfig)


@dataclass
class HeadOptions:
    """Stage A: fine-tune a new classifier on this hop's labels to make the hop's teacher."""

    train_head: bool = False
    """Also train ASPP/decoder/PSA, not only the classifier."""


@dataclass
class DistillOptions:
    """Stage B: L = L_sup + alpha·L_KD + lambda·L_EWC against a frozen teacher."""

    alpha: float = 1.0
    temperature: float = 3.0
    ewc_lambda: float = 1.0
    """EWC weight (the study gives none); needs fisher.safetensors in the teacher's folder, else EWC is off."""
    init_from_teacher: bool = False
    """Start the student from the teacher's weights instead of a fresh (ImageNet/random) backbone."""

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.ewc_lambda < 0 or self.temperature <= 0:
            raise ValueError("alpha and ewc_lambda must be >= 0 and temperature > 0")


@dataclass
class SSLOptions:
    """Stage C: mean teacher with filtered pseudo-labels."""

    unlabeled_shards: str = ""
    """Shard folder of the unlabelled pool ('' = the labelled data's own folder)."""
    unlabeled_split: str = "unlabeled"
    unlabeled_fraction: float = 1.0
    """Deterministic subset of the unlabelled pool (the study's 0.1 / 0.5 / 1.0)."""
    unlabeled_ratio: int = 1
    """Unlabelled micro-batch = this × the labelled micro-batch."""
    tau: float = 0.95
    max_entropy: float | None = None
    """Drop pixels whose normalised entropy is above this (None: no entropy bound)."""
    tile_keep_quantile: float | None = None
    """Keep only the tiles whose mean entropy is among the lowest q of the batch (None: keep all)."""
    lambda_u: float = 1.0
    rampup_steps: int = 0
    """Sigmoid ramp-up of lambda_u over this many steps (0: constant)."""
    consistency: Literal["ce", "kl"] = "ce"
    ema_alpha: float = 0.999
    ema_warmup: bool = False
    tta: tuple[str, ...] = ("identity", "hflip", "vflip", "bright+", "bright-")
    brightness: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.unlabeled_fraction <= 1:
            raise ValueError("unlabeled_fraction must be in (0, 1]")
        if not 0 <= self.tau <= 1 or not 0 < self.ema_alpha < 1:
            raise ValueError("tau must be in [0, 1] and ema_alpha in (0, 1)")
        if self.unlabeled_ratio < 1 or self.lambda_u < 0:
            raise ValueError("unlabeled_ratio must be >= 1 and lambda_u >= 0")


@dataclass
class StageConfig:
    """Everything one stage needs; ``distseg run`` builds these from a recipe, launchers from the CLI."""

    kind: Literal["head", "distill", "ssl"] = "distill"
    out: str = ""
    """The stage folder to write."""
    parent: str | None = None
    """Previous stage folder (or weights file): the model to fine-tune (head), the teacher (distill) or the start
    model (ssl). None for a head stage that starts from ``model.pretrained``."""
    ds_config: str = "ds_configs/cpu_fp32.json"
    micro_batch: int | None = None
    grad_accum: int | None = None
    global_batch: int | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture when there is no parent; with a parent, the parent's architecture is used."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: SupervisedLossConfig = field(default_factory=SupervisedLossConfig)
    head: HeadOptions = field(default_factory=HeadOptions)
    distill: DistillOptions = field(default_factory=DistillOptions)
    ssl: SSLOptions = field(default_factory=SSLOptions)

    def __post_init__(self) -> None:
        if self.kind in ("distill", "ssl") and not self.parent:
            raise ValueError(f"a {self.kind} stage needs a parent stage (teacher / start model)")
