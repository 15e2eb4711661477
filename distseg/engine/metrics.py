"""Segmentation metrics from one confusion matrix (SPEC §6).

The matrix is accumulated on the model's device with a scatter-add (no host sync, so it can sit
inside an evaluation loop without stalling it), summed across ranks with one all-reduce, and only
read back in :meth:`ConfusionMatrix.compute`. Rows are ground truth, columns are predictions.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from distseg.engine.distributed import DistEnv, sum_counts

if TYPE_CHECKING:
    from distseg.data.classes import ClassMap


class ConfusionMatrix:
    """C×C int64 confusion matrix over every pixel of an evaluation, excluding ``ignore_index``."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu") -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = torch.zeros(num_classes * num_classes + 1, dtype=torch.int64, device=device)
        """Flattened matrix plus one overflow bin that absorbs ignored pixels."""

    @property
    def matrix(self) -> Tensor:
        """The C×C view (rows: ground truth, columns: prediction)."""
        return self.counts[:-1].view(self.num_classes, self.num_classes)

    def reset(self) -> None:
        """Zero the counts (start of a new evaluation)."""
        self.counts.zero_()

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: ``pred`` B×H×W class indices (or B×C×H×W scores, argmaxed) against ``target`` B×H×W.

        Target pixels equal to ``ignore_index``, or outside [0, C), are not counted; so are
        predictions outside [0, C).
        """
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        c = self.num_classes
        target = target.to(device=self.counts.device, dtype=torch.int64).flatten()
        pred = pred.to(device=self.counts.device, dtype=torch.int64).flatten()
        valid = (target != self.ignore_index) & (target >= 0) & (target < c) & (pred >= 0) & (pred < c)
        index = torch.where(valid, target * c + pred, torch.full_like(target, c * c))
        self.counts.scatter_add_(0, index, torch.ones_like(index))

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the counts over all ranks when torch.distributed is initialised (else a no-op); returns self."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM)
        return self

    def compute(self) -> dict[str, Any]:
        """Per-class IoU (None = class absent from prediction and ground truth), mIoU, pixel accuracy.

        IoU_c = TP / (TP + FP + FN). mIoU averages the classes that are not None; it and pixel
        accuracy are None when nothing was counted. Plain Python values, ready for JSON.
        """
        m = self.matrix.detach().cpu().double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        ious = [None if u == 0 else float(t / u) for t, u in zip(tp.tolist(), union.tolist())]
        present = [v for v in ious if v is not None]
        total = float(m.sum())
        return {
            "per_class_iou": ious,
            "miou": sum(present) / len(present) if present else None,
            "pixel_acc": float(tp.sum()) / total if total else None,
            "confusion": self.matrix.cpu().tolist(),
        }


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, loader, class_map: "ClassMap", env: DistEnv, autocast) -> dict[str, Any]:
    """Whole-tile validation: one confusion matrix over the split, summed across ranks.

    ``finite_outputs`` says whether every logit was finite: a diverged model can hold finite weights whose outputs
    overflow, and its argmax would still make a (meaningless) confusion matrix.
    """
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(class_map.num_classes, class_map.ignore_index, device=env.device)
    bad = torch.zeros((), dtype=torch.bool, device=env.device)
    for batch in loader:
        with autocast:
            logits = model(batch.image.to(env.device, non_blocking=True))
        bad |= ~logits.isfinite().all()
        cm.update(logits.argmax(1), batch.mask.to(env.device, non_blocking=True))
    cm.all_reduce()
    model.train(was_training)
    result = cm.compute()
    result["class_names"] = class_map.names
    result["finite_outputs"] = sum_counts([int(bad)], env.device)[0] == 0
    return result


def _pct(value: float | None) -> str:
    """A ratio as a percentage with two decimals, or n/a."""
    return "n/a" if value is None else f"{100.0 * value:.2f}"


def _rows(result: dict[str, Any], class_names: Sequence[str]) -> list[tuple[str, str]]:
    """(name, IoU %) for every class, then mIoU and pixel accuracy."""
    ious = result["per_class_iou"]
    if len(class_names) != len(ious):
        raise ValueError(f"{len(class_names)} class names for {len(ious)} classes")
    rows = [(name, _pct(v)) for name, v in zip(class_names, ious)]
    return rows + [("mIoU", _pct(result["miou"])), ("pixel acc", _pct(result["pixel_acc"]))]


def format_table(result: dict[str, Any], class_names: Sequence[str], title: str = "Evaluation"):
    """A ``rich.table.Table`` of per-class IoU (%), mIoU and pixel accuracy, for the console."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("class")
    table.add_column("IoU %", justify="right")
    rows = _rows(result, class_names)
    for i, (name, value) in enumerate(rows):
        table.add_row(name, value, end_section=i == len(rows) - 3)
    return table


def format_markdown(result: dict[str, Any], class_names: Sequence[str]) -> str:
    """The same table as :func:`format_table`, as Markdown (for reports and ``eval.md`` files)."""
    lines = ["| class | IoU % |", "|---|---:|"]
    lines += [f"| {name} | {value} |" for name, value in _rows(result, class_names)]
    return "\n".join(lines) + "\n"
