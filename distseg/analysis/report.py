"""The ranked table (rich, markdown, CSV), the full JSON record and the picture, written all-or-nothing."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from distseg.analysis import GapError
from distseg.analysis.gap import GapResult
from distseg.analysis.ranking import FAMILIES, SIGNALS

COLUMNS = ("rank", "candidate", "tiles", *(sig.label for sig in SIGNALS), "score", "apart by")
"""Table columns, one per ranked signal; 'apart by' is the family that most separated the row from the one above."""


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _cell(signal: str, m: dict[str, Any]) -> str:
    """A signal's table cell; MMD carries its p-value and label overlap the number of shared classes."""
    if m[signal] is None:
        return "n/a"
    if signal == "mmd":
        return f"{m['mmd']:.4f} (p {m['mmd_p']:.3f})"
    if signal == "labels":
        return f"{m['labels']:.2f} ({len(m['shared'])} shared)"
    return _num(m[signal])


def table_rows(result: GapResult) -> list[list[str]]:
    """The ranked table as strings, closest candidate first."""
    rows = []
    for i, name in enumerate(result.ranking.order, 1):
        m, d = result.measures[name], result.datasets[name]
        rows.append([str(i), name, f"{d['encoded']}/{d['sampled']}", *(_cell(sig.name, m) for sig in SIGNALS),
                     _num(result.ranking.score[name]), result.ranking.step_driver.get(name) or ""])
    return rows


def headline(result: GapResult) -> str:
    """One sentence: which family drove the ranking."""
    r = result.ranking
    if r.driver is None:
        return "ranking driven by: nothing (a single candidate, or all scores equal)"
    return f"ranking driven by: {r.driver} ({100 * r.driver_share:.0f} % of the separation between neighbouring rows)"


def print_report(result: GapResult, console=None) -> None:
    """The table on the terminal."""
    from rich.table import Table

    from distseg.pipeline.runner import results_console

    console = console or results_console()
    target = next(iter(result.datasets))
    table = Table(title=f"closeness to {target} ({result.encoder} features)")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("candidate", "apart by") else "right")
    for row in table_rows(result):
        table.add_row(*row)
    console.print(table)
    console.print(headline(result))
    t = result.timing
    console.print(f"feature pass: {t['tiles']} tiles in {t['feature_pass_s']:.1f} s ({t['tiles_per_s']:.1f} tiles/s, "
                  f"{t['feature_pass_cpu_s']:.1f} CPU s, {t['threads']} threads); analysis {t['wall_s']:.1f} s wall, "
                  f"{t['cpu_s']:.1f} s CPU")


def markdown(result: GapResult, picture: str | None) -> str:
    """The report page: what was compared, the ranked table, per-depth distances, the picture."""
    target = next(iter(result.datasets))
    d = result.datasets[target]
    lines = [f"# Domain gap to {target}", "",
             f"Target: `{d['folder']}` (splits {', '.join(d['splits'])}; {d['encoded']} of {d['sampled']} sampled "
             f"tiles encoded). Features: {result.encoder}, {result.config.size}-px centre crops. "
             f"{headline(result)}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    depths = len(next(iter(result.measures.values()))["fd_depths"])
    lines += ["", "Fréchet distance per depth (relative to the target's total feature variance):", "",
              "| candidate | " + " | ".join(f"depth {i + 1}" for i in range(depths)) + " |",
              "|---|" + "---|" * depths]
    lines += [f"| {n} | " + " | ".join(f"{v:.3f}" for v in result.measures[n]["fd_depths"]) + " |"
              for n in result.ranking.order]
    if picture:
        lines += ["", f"![2-D embedding of the tiles]({picture})"]
    return "\n".join(lines) + "\n"


def csv_rows(result: GapResult) -> list[dict[str, Any]]:
    """One flat record per candidate, every measured value."""
    rows = []
    for i, name in enumerate(result.ranking.order, 1):
        m = result.measures[name]
        row = {"rank": i, "candidate": name, **{k: v for k, v in result.datasets[name].items() if k != "splits"},
               "splits": ",".join(result.datasets[name]["splits"])}
        row.update({sig.name: m.get(sig.name) for sig in SIGNALS})
        row["mmd_p"] = m["mmd_p"]
        row.update({f"fd_depth{j + 1}": v for j, v in enumerate(m["fd_depths"])})
        row.update({f"fd_raw_depth{j + 1}": v for j, v in enumerate(m["fd_raw"])})
        row["shared_classes"] = ";".join(m["shared"]) if m["shared"] is not None else None
        row["score"] = result.ranking.score[name]
        row.update({f"family_{f}": result.ranking.family_score[name].get(f) for f in FAMILIES})
        row["apart_by"] = result.ranking.step_driver.get(name)
        rows.append(row)
    return rows


def record(result: GapResult) -> dict[str, Any]:
    """The JSON record: config, datasets, measures, ranking and timing."""
    return {"config": dataclasses.asdict(result.config), "encoder": result.encoder, "datasets": result.datasets,
            "measures": result.measures, "ranking": dataclasses.asdict(result.ranking), "timing": result.timing}


def check_out(out: Path, force: bool) -> None:
    """Refuse an output path that is a file, or a non-empty folder without ``force`` (checked before any work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GapError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise GapError(f"{out}: folder is not empty (use --force to replace it)")


def _prepare(out: Path, force: bool) -> Path:
    """The temporary sibling folder the report is written into."""
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def write_report(result: GapResult, out: Path, force: bool = False) -> Path:
    """Write ranking.md, ranking.csv, gap.json and embedding.png into ``out`` (replaced only on success)."""
    from distseg.analysis.embedding import embed_2d, save_figure

    out = Path(out)
    tmp = _prepare(out, force)
    try:
        start, picture = time.perf_counter(), None
        if result.config.embed_tiles:
            coords = embed_2d({n: s.embeddings for n, s in result.stats.items()}, result.config.embed_tiles,
                              result.config.seed)
            if any(len(c) for c in coords.values()):
                picture = "embedding.png"
                save_figure(coords, tmp / picture, f"t-SNE of {result.encoder} features")
        result.timing["embedding_s"] = time.perf_counter() - start
        (tmp / "ranking.md").write_text(markdown(result, picture))
        rows = csv_rows(result)
        with open(tmp / "ranking.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (tmp / "gap.json").write_text(json.dumps(record(result), indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
