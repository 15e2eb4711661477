"""Stage C: the semi-supervised mean teacher.

Per micro-step: a labelled batch and an unlabelled batch; the EMA teacher labels the weak view under averaged
test-time augmentation; one fused op turns its probabilities into pseudo-labels and a keep mask; the student sees the
strong view of the same crops and minimises L_sup + λ_u(t)·L_cons. The strong view is photometric, plus CutMix boxes
when ``data.stream.augment.cutmix_prob > 0``: the loader's mixing plan is then applied to the pseudo-labels, the keep
mask and the teacher probabilities too, so every target still lines up with its pixel. The teacher follows the
student by EMA after every applied optimizer step.

The student runs two forwards per micro-step, labelled then unlabelled, rather than one on the concatenation, and
BatchNorm running statistics are updated by the labelled forward only (:func:`running_stats_frozen` around the strong
one). Those statistics are what the EMA hands to the teacher and what evaluation uses: letting grayscale, jittered
and blurred views into them cost 0.02-0.04 val mIoU even with λ_u = 0, and one concatenated forward also normalises
the clean labelled images with statistics shared with the strong views. With ``bn_stats: pool`` the running
statistics follow the pool's weak views instead (one no-grad student forward per step) and the labelled forward
leaves them alone: with labels from one town and imagery of another, the fine-tune's own statistics made it find 29 %
of the target's building pixels, and 300 steps with pool statistics and λ_u = 0 lifted its building IoU from 27.6
to 41.0 (one seed), while the pseudo-labels on top of them cost 5.1 (13.7 without ``source_mix``).
Measurements: docs/ssl_findings.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import nn

from distseg.data.augment import apply_cutmix
from distseg.data.batch import Batch, Batches
from distseg.engine.state import EMAOptions
from distseg.losses import consistency_loss
from distseg.ops.balance import ClassBalance, labelled_share, source_class_counts
from distseg.ops.classmix import paste_labelled
from distseg.ops.pseudo import PseudoLabels, pseudo_label, tta_probs
from distseg.ops.thresholds import ClassThresholds
from distseg.stages.common import StageError, build_from, parent_matching
from distseg.stages.registry import StageKind
from distseg.stages.task import Student, Task, labelled


@dataclass
class SSLOptions:
    """Stage C: mean teacher with filtered pseudo-labels (the pool itself is ``data.unlabeled``)."""

    tau: float = 0.95
    """Confidence threshold: a pixel's pseudo-label reaches the loss only when the teacher's TTA probability of its
    class is at least this."""
    adaptive_tau: bool = False
    """Per-class thresholds τ·σ_c/max σ from the teacher's running confidence per class (ops/thresholds.py), so
    the classes it is less sure of still reach the loss; False keeps one τ for all."""
    max_entropy: float | None = None
    """Drop pixels whose normalised entropy is above this (None: no entropy bound)."""
    tile_keep_quantile: float | None = None
    """Keep only the tiles whose mean entropy is among the lowest q of the batch (None: keep all)."""
    lambda_u: float = 1.0
    """Weight of the consistency loss. 0 is the control: the same stage without it (no pool is read)."""
    rampup_steps: int = 0
    """Sigmoid ramp-up of lambda_u over this many steps (0: constant)."""
    consistency: Literal["ce", "kl"] = "ce"
    """Consistency loss on kept pixels: cross-entropy against the hard pseudo-labels, or KL to the teacher's soft
    probabilities."""
    ema: EMAOptions = field(default_factory=EMAOptions)
    """The teacher: an EMA of the student after every applied optimizer step (alpha, warmup_steps)."""
    tta: tuple[str, ...] = ("identity", "hflip", "vflip", "bright+", "bright-")
    """The teacher's test-time augmentations, averaged into its probabilities (identity, hflip, vflip, bright+,
    bright-); each view costs one teacher forward."""
    brightness: float = 0.1
    """Brightness offset of the bright+/bright- views."""
    feature_dropout: float = 0.0
    """UniMatch's feature perturbation: the student also predicts the weak view with this channel dropout on its
    encoder features, against the same pseudo-labels; the two consistency terms are then averaged (0: off)."""
    balance_bound: float | None = None
    """Class-balance guard rail (ops/balance.py), as r > 1: the running share of each class among kept pseudo-label
    pixels against its share of the labelled pixels is logged as ``class_share_ratio`` (per pool folder with
    ``balance_by_source``); each kept pixel's consistency term is weighted by clip(1/ratio, 1/r, r), and λ_u is
    damped by min(1, r / worst ratio) once a class leaves [1/r, r], so a run drifting toward one class leans on its
    labels instead (None: off)."""
    balance_momentum: float = 0.95
    """EMA momentum per micro-step of the running pseudo-label class share (with ``balance_bound``)."""
    balance_by_source: bool = True
    """With a pool of several folders (``data.unlabeled``), track the guard rail per folder: one running share, one
    set of weights and one ratio in the log (``class_share_ratio/<folder>``) per source, damping by the worst. A ratio
    over the mixed pool can read 0.9 while the imagery to map is at 0.2. False: one share over the whole pool."""
    bn_stats: Literal["labelled", "pool"] = "labelled"
    """Which images the BatchNorm running statistics follow, and so those the teacher and the exported model
    normalise with: the labelled crops, or the pool's weak views (one extra no-grad student forward per step). With
    labels from one place and imagery of another, 'pool' lets the model normalise the imagery to map with
    statistics that include it; the labelled batch is then normalised by its own batch statistics only."""
    source_mix: float = 0.0
    """Cross-domain ClassMix (ops/classmix.py): the probability that a pool crop's strong view gets the pixels of
    half the minority classes of a labelled crop pasted in (never its majority class), carrying their true labels,
    so the student meets labelled objects in the pool's context (0: off)."""

    def __post_init__(self) -> None:
        if not 0 <= self.tau <= 1:
            raise ValueError(f"tau must be in [0, 1], got {self.tau}")
        if not 0 <= self.feature_dropout < 1:
            raise ValueError(f"feature_dropout must be in [0, 1), got {self.feature_dropout}")
        if self.lambda_u < 0:
            raise ValueError("lambda_u must be >= 0")
        if self.balance_bound is not None and self.balance_bound <= 1:
            raise ValueError(f"balance_bound must be > 1 or null, got {self.balance_bound}")
        if not 0 <= self.source_mix <= 1:
            raise ValueError(f"source_mix must be in [0, 1], got {self.source_mix}")
        if not 0 <= self.balance_momentum < 1:
            raise ValueError(f"balance_momentum must be in [0, 1), got {self.balance_momentum}")


class Targets(NamedTuple):
    """What the student is trained against on one unlabelled batch."""

    strong: torch.Tensor
    """The strong view (CutMix applied when planned)."""
    labels: torch.Tensor
    """Pseudo-labels aligned with ``strong``."""
    keep: torch.Tensor
    """Kept pixels aligned with ``strong``."""
    soft: torch.Tensor | None
    """Teacher probabilities aligned with ``strong`` (KL consistency only)."""
    pseudo: PseudoLabels
    """The teacher's pseudo-labels of the weak view, before mixing (and their statistics)."""
    probs: torch.Tensor
    """The teacher's TTA probabilities of the weak view, before mixing."""
    source: torch.Tensor
    """B×H×W pool source of each pixel of ``strong`` (CutMix boxes carry their sample's)."""
    weak_source: torch.Tensor
    """B×H×W pool source of each pixel of the weak view, aligned with ``pseudo``."""


def rampup(step: int, length: int) -> float:
    """Sigmoid ramp-up exp(−5(1 − t)²) from 0 to 1 over ``length`` steps (1 when length is 0)."""
    if length <= 0 or step >= length:
        return 1.0
    t = step / length
    return math.exp(-5.0 * (1.0 - t) ** 2)


@contextlib.contextmanager
def running_stats_frozen(model: nn.Module) -> Iterator[None]:
    """``model``'s BatchNorm layers still normalise with batch statistics but leave their running statistics
    unchanged.

    Momentum 0 makes the running-average update an identity, without touching the autograd path.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(layers, saved):
            m.momentum = momentum


class SSLTask(Task):
    """Student in the engine; the EMA teacher beside it pseudo-labels the pool's weak views."""

    def build(self) -> Student:
        parent = parent_matching(self.ctx.parent, self.class_map, "start model")
        student = build_from(parent)
        self.teacher = self.state.ema("teacher", student, self.options.ema, deploy=True)
        self.thresholds = self.state.stateful("class_tau", ClassThresholds(
            self.class_map.num_classes, self.options.tau, device=self.env.device)) if self.options.adaptive_tau \
            else None
        self.sources = self.balance_sources()
        self.balance = self.state.stateful("class_balance", ClassBalance(
            self.labelled_share(), bound=self.options.balance_bound, momentum=self.options.balance_momentum,
            device=self.env.device, sources=len(self.sources))) if self.options.balance_bound is not None else None
        return Student(student, list(student.parameters()), dataclasses.replace(parent.model_cfg, pretrained=None))

    def labelled_share(self) -> list[float]:
        """Each class's share of the labelled train pixels (the manifest's counts): the guard rail's reference."""
        try:
            return labelled_share(self.ctx.data.manifest, self.class_map.names, self.cfg.data.train_split)
        except ValueError as exc:
            raise StageError(f"{self.cfg.data.shards}: ssl.balance_bound needs class pixel counts ({exc})") from None

    def balance_sources(self) -> list[str]:
        """The names the guard rail tracks and logs: one per pool folder (the folder's name, or its position when
        two share a name), or one for the whole pool (the loader numbers samples by folder in the same order)."""
        if not self.options.balance_by_source:
            return ["pool"]
        names = [Path(folder).name for folder in self.cfg.data.pool(True)]
        return names if len(set(names)) == len(names) else [str(i) for i in range(len(names))]

    def streams(self) -> tuple[str, ...]:
        """The λ_u = 0 control trains on labels alone, so it neither reads nor pseudo-labels the pool, unless the
        running statistics follow the pool (then it reads the pool for them, as the SSL run it controls does)."""
        opts = self.options
        return super().streams() if opts.lambda_u > 0 or opts.bn_stats == "pool" else ("labelled",)

    def step(self, batches: Batches) -> dict[str, torch.Tensor]:
        opts = self.options
        with self.labelled_stats():
            _, out = self.supervised(labelled(batches))
        if opts.bn_stats == "pool":
            self.follow_pool_stats(batches.unlabelled)
        if opts.lambda_u == 0:
            return out
        t = self.pseudo_targets(batches.unlabelled)
        if self.balance is not None:
            self.balance.update(source_class_counts(t.pseudo.labels, t.pseudo.keep, t.weak_source, len(self.sources),
                                                    self.class_map.num_classes))
        if opts.source_mix > 0:
            t, out["pasted_fraction"] = self.paste_labelled(t, labelled(batches))
        sup = out["loss"]
        with self.autocast, running_stats_frozen(self.student):
            logits_u = self.engine(t.strong).float()
        cons = consistency_loss(logits_u, t.labels, t.keep, kind=opts.consistency, teacher_probs=t.soft,
                                pixel_weights=self.weights(t.labels, t.keep, t.source))
        out["cons"] = cons.detach()
        if opts.feature_dropout > 0:
            with self.autocast, running_stats_frozen(self.student):
                logits_fp = self.engine(batches.unlabelled.image, feature_dropout=opts.feature_dropout).float()
            soft = t.probs if opts.consistency == "kl" else None
            cons_fp = consistency_loss(logits_fp, t.pseudo.labels, t.pseudo.keep, kind=opts.consistency,
                                       teacher_probs=soft,
                                       pixel_weights=self.weights(t.pseudo.labels, t.pseudo.keep, t.weak_source))
            cons, out["cons_fp"] = 0.5 * (cons + cons_fp), cons_fp.detach()
        weight = opts.lambda_u * rampup(getattr(self.engine, "global_steps", 0), opts.rampup_steps)
        if self.balance is not None:
            damping = self.balance.damping()
            weight = weight * damping
            out.update(self.share_ratios(), balance_damping=damping)
        pl = t.pseudo
        if self.thresholds is not None:
            out["class_tau"] = self.thresholds.thresholds()
        return {**out, "loss": sup + weight * cons,
                "kept_fraction": pl.kept_fraction.mean(), "confidence": pl.mean_confidence.mean(),
                "entropy": pl.mean_entropy.mean(), "class_hist": pl.class_hist.float()}

    def labelled_stats(self) -> contextlib.AbstractContextManager:
        """Around the labelled forward: it updates the running statistics unless they follow the pool."""
        return running_stats_frozen(self.student) if self.options.bn_stats == "pool" else contextlib.nullcontext()

    @torch.no_grad()
    def follow_pool_stats(self, unl: Batch) -> None:
        """One train-mode forward of the student on the pool's weak views: only the BN running statistics change
        (the EMA then carries them to the teacher)."""
        with self.autocast:
            self.engine(unl.image)

    def paste_labelled(self, t: Targets, source: Batch) -> tuple[Targets, torch.Tensor]:
        """``t`` with half the minority classes of a labelled crop pasted into its strong views (ops/classmix.py), and the
        pasted share of the pixels; KL targets become one-hot where pasted."""
        mixed = paste_labelled(t.strong, t.labels, t.keep, source.image, source.mask,
                               num_classes=self.class_map.num_classes, ignore_index=self.class_map.ignore_index,
                               prob=self.options.source_mix)
        soft = t.soft
        if soft is not None:
            onehot = nn.functional.one_hot(mixed.labels.clamp(0, soft.shape[1] - 1), soft.shape[1])
            soft = torch.where(mixed.pasted.unsqueeze(1), onehot.permute(0, 3, 1, 2).to(soft.dtype), soft)
        return t._replace(strong=mixed.image, labels=mixed.labels, keep=mixed.keep, soft=soft), \
            mixed.pasted.float().mean()

    def weights(self, labels: torch.Tensor, keep: torch.Tensor, source: torch.Tensor) -> torch.Tensor | None:
        """Per-pixel consistency weights of the class-balance guard rail (None when it is off)."""
        return self.balance.pixel_weights(labels, keep, source) if self.balance is not None else None

    def source_of(self, unl: Batch) -> torch.Tensor:
        """B×H×W: the guard rail's source index of every pixel of the pool batch's weak view (0 for one source)."""
        b, _, h, w = unl.image.shape
        if unl.source is None or len(self.sources) == 1:
            return torch.zeros((b, h, w), dtype=torch.long, device=unl.image.device)
        return unl.source.long()[:, None, None].expand(b, h, w)

    def share_ratios(self) -> dict[str, torch.Tensor]:
        """The guard rail's ratios to log: ``class_share_ratio`` [C], or one ``class_share_ratio/<source>`` each."""
        ratio = self.balance.ratio()
        if len(self.sources) == 1:
            return {"class_share_ratio": ratio[0]}
        return {f"class_share_ratio/{name}": r for name, r in zip(self.sources, ratio)}

    def pseudo_targets(self, unl: Batch) -> Targets:
        """The strong view and its targets (labels, keep mask, teacher probs for KL) after CutMix, and the teacher's
        own pseudo-labels and probabilities of the weak view before mixing."""
        opts = self.options
        with self.autocast:
            probs = tta_probs(self.teacher, unl.image, opts.tta, opts.brightness)
        tau = opts.tau
        if self.thresholds is not None:
            self.thresholds.update(probs)
            tau = self.thresholds.thresholds()
        pl = pseudo_label(probs, tau=tau, max_entropy=opts.max_entropy, from_logits=False,
                          ignore_index=self.class_map.ignore_index, tile_keep_quantile=opts.tile_keep_quantile)
        weak_source = self.source_of(unl)
        labels, keep, source = pl.labels, pl.keep, weak_source
        soft = probs if opts.consistency == "kl" else None
        if unl.cutmix_box is not None:
            box, index = unl.cutmix_box, unl.cutmix_index
            labels, keep, source = (apply_cutmix(x, box, index) for x in (labels, keep, source))
            soft = apply_cutmix(soft, box, index) if soft is not None else None
        return Targets(unl.image_strong, labels, keep, soft, pl, probs, source, weak_source)


KIND = StageKind("ssl", SSLTask, SSLOptions, unlabelled=True, unlabelled_views=("weak", "strong"), script="ssl.py",
                 summary="the mean teacher: EMA teacher pseudo-labels the unlabelled pool for the student")
