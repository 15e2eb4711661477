"""The results table of a run: one row per eval stage, written as results.md and results.csv.

A row's headline is the evaluated stage's model at the end of its fixed schedule (eval.json's ``whole_tile``); the
model validation chose during training (eval.json's ``best_val``) is reported beside it, never instead.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from distseg.engine import checkpoint as ckpt
from distseg.pipeline.plan import Plan, PlannedStage
from distseg.pipeline.recipe import EVAL

TIMINGS = "timings.json"


@dataclass
class ResultRow:
    """Test-split metrics of one evaluated model, with what it cost."""

    label: str
    stage: str
    """The evaluated training stage."""
    split: str
    class_names: list[str]
    per_class_iou: list[float | None]
    miou: float | None
    pixel_acc: float | None
    labeled: int | None
    unlabeled: int | None
    stage_seconds: float | None
    """Wall time of the evaluated stage's own run."""
    chain_seconds: float | None
    """Wall time of the evaluated stage and all its ancestors (each counted once): what the model cost."""
    chain_cpu_seconds: float | None = None
    """CPU time of the same chain (steadier than wall time on a shared machine)."""
    seed: int | None = None
    """The chain's training seed when the recipe lists ``seeds``."""
    per_class_precision: list[float | None] | None = None
    """Per class: its correctly predicted pixels / all pixels predicted as it (None: never predicted)."""
    per_class_recall: list[float | None] | None = None
    """Per class: its correctly predicted pixels / all its true pixels (None: absent from the ground truth)."""
    best_val_step: int | None = None
    """Step of the model validation chose during training (None: the stage did not validate)."""
    best_val_per_class_iou: list[float | None] | None = None
    """Per-class IoU of that best-validation model, on the same split as the headline."""
    best_val_miou: float | None = None
    """mIoU of the best-validation model (reported beside the headline ``miou``, never instead)."""


@dataclass
class SummaryRow:
    """One row label over its seeds: means, the spread and the per-seed values."""

    label: str
    rows: list[ResultRow]

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.rows]

    def mean(self, values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) / len(known) if known and len(known) == len(values) else None

    @property
    def miou(self) -> float | None:
        return self.mean([r.miou for r in self.rows])

    @property
    def spread(self) -> float | None:
        """Sample standard deviation of mIoU over seeds (None for one seed)."""
        values = [r.miou for r in self.rows]
        if len(values) < 2 or None in values:
            return None
        m = sum(values) / len(values)
        return (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5

    def class_iou(self, name: str) -> float | None:
        return self.mean([dict(zip(r.class_names, r.per_class_iou)).get(name) for r in self.rows])

    def class_metric(self, field: str, name: str) -> float | None:
        """Mean over seeds of a per-class list ``field`` (``per_class_precision``, ``per_class_recall``)."""
        return self.mean([dict(zip(r.class_names, getattr(r, field) or [])).get(name) for r in self.rows])

    def best_val(self) -> str:
        """Mean best-validation mIoU over seeds with the step(s) validation chose (per seed when they differ);
        empty when a seed's stage did not validate."""
        miou = self.mean([r.best_val_miou for r in self.rows])
        if miou is None:
            return ""
        steps = ["n/a" if r.best_val_step is None else str(r.best_val_step) for r in self.rows]
        return f"{_pct(miou)} ({steps[0] if len(set(steps)) == 1 else ' / '.join(steps)})"

    def delta(self, baseline: SummaryRow) -> list[float] | None:
        """Per-seed mIoU differences to ``baseline``, paired by seed (None when the seeds do not pair up)."""
        theirs = {r.seed: r.miou for r in baseline.rows}
        if any(r.seed not in theirs or r.miou is None or theirs[r.seed] is None for r in self.rows):
            return None
        return [r.miou - theirs[r.seed] for r in self.rows]


def summarise(rows: list[ResultRow]) -> list[SummaryRow]:
    """Rows grouped by label, in order of first appearance (one group per row of the table)."""
    groups: dict[str, list[ResultRow]] = {}
    for row in rows:
        groups.setdefault(row.label, []).append(row)
    return [SummaryRow(label, members) for label, members in groups.items()]


def load_timings(run_dir: Path) -> dict[str, dict[str, float]]:
    """Stage name -> {"wall": s, "cpu": s}: what each stage that ran cost (:func:`stage_timing`); skipped stages
    keep theirs."""
    path = run_dir / TIMINGS
    return json.loads(path.read_text()) if path.is_file() else {}


def stage_timing(folder: Path, seconds: float, cpu: float) -> dict[str, float]:
    """A stage's entry in timings.json once it has run: the cost its record gives for the whole schedule (every
    piece of an interrupted and resumed run, every rank: :mod:`distseg.engine.cost`) when that goes back to step 0,
    else ``seconds`` and ``cpu`` as the runner measured this invocation (evaluations; stages resumed from
    checkpoints written before costs were recorded)."""
    cost = ckpt.read_stage(folder).get("cost") if (folder / ckpt.STAGE_JSON).is_file() else None
    if cost and cost.get("complete"):
        return {"wall": cost["wall_s"], "cpu": cost["cpu_s"]}
    return {"wall": seconds, "cpu": cpu}


def save_timings(run_dir: Path, timings: dict[str, dict[str, float]]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.write_json_atomic(run_dir / TIMINGS, timings)


def _ancestors(plan: Plan, name: str | None) -> list[str]:
    """``name`` and every stage above it, parents last."""
    stages, out = plan.by_name(), []
    while name is not None:
        out.append(name)
        name = stages[name].spec.parent
    return out


def _chain_total(chain: list[str], timings: dict[str, dict[str, float]], key: str) -> float | None:
    """Sum of one timing over a chain; None when any stage's timing is unknown (run elsewhere)."""
    values = [timings.get(name, {}).get(key) for name in chain]
    return sum(values) if chain and None not in values else None


def precision_recall(confusion: list[list[int]]) -> tuple[list[float | None], list[float | None]]:
    """Per-class precision and recall from a confusion matrix (rows: ground truth, columns: prediction)."""
    n = len(confusion)
    tp = [confusion[c][c] for c in range(n)]
    predicted = [sum(confusion[t][c] for t in range(n)) for c in range(n)]
    true = [sum(confusion[c]) for c in range(n)]
    return ([t / p if p else None for t, p in zip(tp, predicted)],
            [t / g if g else None for t, g in zip(tp, true)])


def _row(plan: Plan, stage: PlannedStage, timings: dict[str, dict[str, float]]) -> ResultRow:
    saved = json.loads((stage.folder / "eval.json").read_text())
    metrics = saved["whole_tile"]
    trained = stage.spec.parent
    record = ckpt.read_stage(plan.run_dir / trained) if trained else {}
    chain = _ancestors(plan, trained)
    precision, recall = precision_recall(metrics["confusion"]) if "confusion" in metrics else (None, None)
    best = saved.get("best_val") or {"step": None, "whole_tile": {}}
    return ResultRow(
        label=stage.spec.label or stage.name, stage=trained or str(stage.parent_path), split=saved["split"],
        class_names=list(metrics["class_names"]), per_class_iou=list(metrics["per_class_iou"]),
        miou=metrics["miou"], pixel_acc=metrics["pixel_acc"], labeled=record.get("labeled_samples"),
        unlabeled=record.get("unlabeled_samples"), stage_seconds=timings.get(trained or "", {}).get("wall"),
        chain_seconds=_chain_total(chain, timings, "wall"), chain_cpu_seconds=_chain_total(chain, timings, "cpu"),
        seed=stage.spec.seed, per_class_precision=precision, per_class_recall=recall, best_val_step=best["step"],
        best_val_per_class_iou=best["whole_tile"].get("per_class_iou"), best_val_miou=best["whole_tile"].get("miou"))


def collect_rows(plan: Plan) -> list[ResultRow]:
    """Rows of every eval stage whose eval.json exists, in recipe order."""
    timings = load_timings(plan.run_dir)
    evals = [s for s in plan.stages if s.kind == EVAL and (s.folder / "eval.json").is_file()]
    order = {spec.name: i for i, spec in enumerate(plan.recipe.stages)}
    return [_row(plan, s, timings) for s in sorted(evals, key=lambda s: order[s.name])]


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _secs(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def _classes(rows: list[ResultRow]) -> list[str]:
    """The union of the rows' classes in first-seen order."""
    classes: list[str] = []
    for row in rows:
        classes += [c for c in row.class_names if c not in classes]
    return classes


def foreground(rows: list[ResultRow]) -> str | None:
    """The class whose precision and recall the table shows: the second of a two-class map (background 0 /
    object 1, e.g. buildings), where IoU alone hides whether a model misses objects or invents them; None for
    other maps (the CSV holds every class's precision and recall) or rows without a confusion matrix."""
    classes = _classes(rows)
    return classes[1] if len(classes) == 2 and any(r.per_class_precision for r in rows) else None


def table(rows: list[ResultRow], baseline: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and text cells of the summary table: one line per row label, means over its seeds."""
    classes, groups = _classes(rows), summarise(rows)
    base = next((g for g in groups if g.label == baseline), None)
    seeded = any(r.seed is not None for r in rows)
    fg = foreground(rows)
    detail = [f"{fg} precision", f"{fg} recall"] if fg else []
    validated = any(r.best_val_miou is not None for r in rows)  # no column when no stage validated in training
    header = ["row", "stage", *classes, *detail, "mIoU"] + (["± sd", "per seed"] if seeded else []) + \
        ([f"Δ vs {baseline}"] if base else []) + (["best-val mIoU (step)"] if validated else []) + \
        ["labelled", "unlabelled", "stage s", "chain s", "chain CPU s"]
    cells = []
    for g in groups:
        first = g.rows[0]
        stage = first.stage.removesuffix(f".s{first.seed}") if first.seed is not None else first.stage
        line = [g.label, stage, *[_pct(g.class_iou(c)) if c in first.class_names else "" for c in classes],
                *[_pct(g.class_metric(f, fg)) for f in ("per_class_precision", "per_class_recall") if fg],
                _pct(g.miou)]
        if seeded:
            line += [_pct(g.spread), " / ".join(_pct(r.miou) for r in g.rows)]
        if base:
            deltas = g.delta(base)
            line.append("n/a" if deltas is None else f"{100 * sum(deltas) / len(deltas):+.2f} ("
                        + ", ".join(f"{100 * d:+.2f}" for d in deltas) + ")")
        if validated:
            line.append(g.best_val())
        line += [str(first.labeled if first.labeled is not None else "n/a"),
                 str(first.unlabeled if first.unlabeled is not None else "n/a"),
                 *[_secs(g.mean([getattr(r, k) for r in g.rows]))
                   for k in ("stage_seconds", "chain_seconds", "chain_cpu_seconds")]]
        cells.append(line)
    return header, cells


def write_results(rows: list[ResultRow], run_dir: Path, title: str, baseline: str | None = None) -> tuple[Path, Path]:
    """results.md (the summary table, IoU in %) and results.csv (one line per evaluated model: IoU, precision and
    recall per class as fractions, seconds unrounded, with its seed; the best-validation model's step, mIoU and
    per-class IoU last, so readers of the earlier columns are unaffected)."""
    header, cells = table(rows, baseline)
    seeds = sorted({r.seed for r in rows if r.seed is not None})
    about = f"mean over seeds {', '.join(map(str, seeds))}; " if seeds else ""
    fg = foreground(rows)
    shown = f"Per-class IoU, {fg} precision and recall, and mIoU" if fg else "Per-class IoU and mIoU"
    md = [f"# {title}", "", f"{shown} in % on the {rows[0].split if rows else 'test'} split ({about}"
          "± sd: sample standard deviation over seeds) of each model at the end of its fixed schedule; best-val: the "
          "model validation chose during training (its step), beside it, empty when the stage did not validate; "
          "wall and CPU times in seconds (chain: the stage and all its ancestors).", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in cells]
    md_path, csv_path = run_dir / "results.md", run_dir / "results.csv"
    md_path.write_text("\n".join(md) + "\n")
    classes = _classes(rows)
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["row", "seed", "stage", "split", *[f"iou_{c}" for c in classes],
                         *[f"{m}_{c}" for m in ("precision", "recall") for c in classes], "miou", "pixel_acc",
                         "labeled", "unlabeled", "stage_seconds", "chain_seconds", "chain_cpu_seconds",
                         "best_val_step", "best_val_miou", *[f"best_val_iou_{c}" for c in classes]])
        for row in rows:
            iou = dict(zip(row.class_names, row.per_class_iou))
            best_iou = dict(zip(row.class_names, row.best_val_per_class_iou or []))
            pr = [dict(zip(row.class_names, values or [])) for values in (row.per_class_precision,
                                                                          row.per_class_recall)]
            writer.writerow([row.label, _num(row.seed), row.stage, row.split, *[_num(iou.get(c)) for c in classes],
                             *[_num(m.get(c)) for m in pr for c in classes],
                             _num(row.miou), _num(row.pixel_acc), _num(row.labeled), _num(row.unlabeled),
                             _num(row.stage_seconds), _num(row.chain_seconds), _num(row.chain_cpu_seconds),
                             _num(row.best_val_step), _num(row.best_val_miou),
                             *[_num(best_iou.get(c)) for c in classes]])
    return md_path, csv_path


def _num(v) -> str:
    return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))


def rich_table(rows: list[ResultRow], title: str, baseline: str | None = None):
    """The same table for the terminal."""
    from rich.table import Table

    header, cells = table(rows, baseline)
    out = Table(title=title)
    for i, h in enumerate(header):
        out.add_column(h, justify="left" if i < 2 else "right")
    for r in cells:
        out.add_row(*r)
    return out
