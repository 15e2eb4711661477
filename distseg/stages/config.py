"""Typed configs of a training stage; the resolved config is saved in every stage folder's ``stage.json``."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

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
    """L2 penalty (SGD) or decoupled weight decay (AdamW)."""
    schedule: Literal["poly", "constant"] = "poly"
    """'poly': lr·(1 − t/T)^power after warm-up; 'constant': lr after warm-up."""
    poly_power: float = 0.9
    """Exponent of the poly learning-rate decay lr·(1 − step/steps)^power after the warm-up."""
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
    """Complete checkpoints kept in ``checkpoint/`` (older ones are pruned)."""
    seed: int = 0
    """Training seed: initial weights, data order and augmentation (a recipe's ``seeds`` set it per chain)."""
    eval_batch_size: int = 4
    """Tiles per rank per validation batch."""
    fisher_batches: int = 16
    """Batches of this stage's training data used for the diagonal Fisher saved at the end (0: skip)."""
    max_skipped_steps: int = 20
    """Stop with an error after this many optimizer steps in a row were skipped because the loss or the gradients
    were not finite (NaN/inf; fp16 overflows count too). Each skip is logged (``skipped_steps``)."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if min(self.log_every, self.keep_checkpoints, self.eval_batch_size, self.max_skipped_steps) < 1:
            raise ValueError("log_every, keep_checkpoints, eval_batch_size and max_skipped_steps must be >= 1")
        if min(self.eval_every, self.ckpt_every, self.fisher_batches) < 0:
            raise ValueError("eval_every, ckpt_every and fisher_batches must be >= 0")


@dataclass
class DataConfig:
    """Which shards a stage reads: the labelled folder and, for kinds that read one, an unlabelled pool."""

    shards: str = ""
    """Shard folder written by ``distseg shard-data`` (holds manifest.json)."""
    train_split: str = "train"
    """The labelled split trained on."""
    val_split: str = "val"
    """The split validated on (every ``train.eval_every`` steps; skipped when the folder has none)."""
    unlabeled: tuple[str, ...] = ()
    """Shard folders of the unlabelled pool, read together as one pool. Empty: the ``shards`` folder's own
    unlabelled split. A kind that reads no labels pools ``shards`` with these folders."""
    unlabeled_split: str = "unlabeled"
    """The split of each pool folder that forms the unlabelled pool."""
    unlabeled_fraction: float = 1.0
    """Deterministic subset of the unlabelled pool (the study's 0.1 / 0.5 / 1.0)."""
    unlabeled_ratio: int = 1
    """Unlabelled micro-batch = this × the labelled micro-batch (kinds that also read labels)."""
    stream: StreamConfig = field(default_factory=StreamConfig)
    """Loading and augmentation: workers, crop, scale range, strong views, CutMix."""

    def __post_init__(self) -> None:
        self.unlabeled = tuple(self.unlabeled)
        if not 0 < self.unlabeled_fraction <= 1:
            raise ValueError("unlabeled_fraction must be in (0, 1]")
        if self.unlabeled_ratio < 1:
            raise ValueError("unlabeled_ratio must be >= 1")

    def pool(self, reads_labels: bool) -> list[str]:
        """The unlabelled pool's folders: ``unlabeled`` (plus ``shards`` for kinds that read no labels), or
        ``shards`` alone when no pool folder is given."""
        if not self.unlabeled:
            return [self.shards]
        return list(self.unlabeled) if reads_labels else [self.shards, *self.unlabeled]


@dataclass
class StageConfig:
    """Everything one stage needs; ``distseg run`` builds these from a recipe, launchers from the CLI.

    ``options`` holds the kind's own options dataclass (``StageKind.options``). In YAML, JSON and ``--set`` it is
    spelled as a section named after the kind (``ssl: {tau: 0.9}``, ``--set ssl.tau=0.9``), so a saved config reads
    the same as one written by hand.
    """

    kind: str = "distill"
    """A registered stage kind (``distseg.stages.registry``)."""
    out: str = ""
    """The stage folder to write."""
    parent: str | None = None
    """Previous stage folder (or weights file): the model to fine-tune (head), the teacher (distill) or the start
    model (ssl). None for a kind that may start from ``model.pretrained``."""
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
    options: Any = None
    """The kind's options (None: the kind's defaults, or a kind without options)."""

    def __post_init__(self) -> None:
        from distseg.stages.registry import get_kind

        kind = get_kind(self.kind)
        if not kind.trains:
            raise ValueError(f"{self.kind!r} is not a training kind (it has its own command line)")
        if kind.parent == "required" and not self.parent:
            raise ValueError(f"a {self.kind} stage needs a parent stage (--parent)")
        if kind.parent == "none" and self.parent:
            raise ValueError(f"a {self.kind} stage takes no parent")
        if kind.options is not None and self.options is None:
            self.options = kind.options()
        if kind.options is not None and not isinstance(self.options, kind.options):
            raise ValueError(f"options of a {self.kind} stage must be {kind.options.__name__}")

    @classmethod
    def from_mapping(cls, data: dict[str, Any], where: str) -> StageConfig:
        """Read the kind's section into ``options``; another kind's section is an error naming both."""
        from distseg.config import ConfigError, build_fields, from_dict
        from distseg.stages.registry import get_kind, kind_names

        data = dict(data)
        name = data.get("kind", cls.kind)
        try:
            kind = get_kind(name)
        except KeyError as exc:
            raise ConfigError(f"{where}.kind: {exc.args[0]}") from None
        foreign = sorted(k for k in data if k in kind_names() and k != name)
        if foreign or "options" in data:
            raise ConfigError(f"{where}: section(s) {foreign or ['options']} do not apply to a {name} stage "
                              f"(its options section is {name!r})")
        section = data.pop(name, None) or {}
        if section and kind.options is None:
            raise ConfigError(f"{where}.{name}: a {name} stage has no options")
        if kind.options is not None:
            data["options"] = from_dict(kind.options, section, f"{where}.{name}")
        return build_fields(cls, data, where)

    def to_mapping(self) -> dict[str, Any]:
        """The inverse of :meth:`from_mapping`: the options under the kind's name."""
        from distseg.config import to_dict

        out = {f.name: to_dict(getattr(self, f.name)) for f in fields(self) if f.name != "options"}
        if self.options is not None:
            out[self.kind] = to_dict(self.options)
        return out

    def identity(self, world_size: int) -> dict[str, Any]:
        """What makes two runs of a stage "the same run": the requested config, wherever its folder lives, plus the
        DeepSpeed config it resolves to at ``world_size`` processes (the batch arithmetic depends on it).

        The stage saves this in stage.json; ``--resume`` and ``distseg run``'s skip/resume decision both compare it.
        """
        from distseg.engine.dsconfig import load_ds_config, resolve_ds_config, training_sections

        ds = resolve_ds_config(load_ds_config(self.ds_config), world_size, micro_batch=self.micro_batch,
                               grad_accum=self.grad_accum, global_batch=self.global_batch, source=self.ds_config)
        requested = {k: v for k, v in self.to_mapping().items() if k != "out"}
        return {"config": requested, "ds_config_resolved": training_sections(ds)}
