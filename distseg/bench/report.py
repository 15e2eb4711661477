"""Tables and charts of benchmark records: rich tables on the console, markdown + PNG for ``bench report``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

RUN_COLUMNS = ("run", "device", "procs", "mb", "prec", "img/s", "img/s/GPU", "step ms med/p90", "data-wait",
               "mem GiB", "TFLOPS/GPU", "MFU", "config")
SCALING_COLUMNS = ("procs", "img/s", "img/s/proc", "speed-up", "efficiency", "step ms med", "data-wait")
_CONSOLE_DROP = ("device", "config")  # the device goes in the title; the hash is in the record and the report


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f} %"


def run_label(r: dict[str, Any]) -> str:
    """What was run: stage (or 'infer'), backbone, crop size and the options that change speed."""
    opts = r.get("config", {}).get("bench", r.get("config", {}).get("options", {}))
    flags = [name for name, key in (("cl", "channels_last"), ("compile", "compile")) if opts.get(key)]
    if r.get("config", {}).get("bench", {}).get("model", {}).get("grad_checkpointing"):
        flags.append("ckpt")
    return f"{r.get('stage')} {r.get('backbone')} {r.get('size')}px" + (f" +{'+'.join(flags)}" if flags else "")


def run_row(r: dict[str, Any], with_tag: bool = False) -> list[str]:
    """One table row of a train/infer record (an OOM row keeps only what was attempted)."""
    step = r.get("step_time_s") or {}
    med, p90 = step.get("median"), step.get("p90")
    step_text = "" if med is None else f"{1e3 * med:.1f}" + ("" if p90 is None else f" / {1e3 * p90:.1f}")
    if r.get("status") == "oom":
        step_text = "OOM"
    memory = r.get("peak_memory_gb") or []
    label = run_label(r) + (f" ({r['tag']})" if with_tag and r.get("tag") else "")
    return [label, str(r["device"]["name"]), str(r.get("world_size")), str(r.get("micro_batch")),
            str(r.get("precision") or ""), _num(r.get("images_per_s"), ".1f"),
            _num(r.get("images_per_s_per_gpu"), ".1f"),
            step_text, _pct(r.get("data_wait_fraction")), _num(max(memory) if memory else None, ".2f"),
            _num(r.get("tflops_per_gpu"), ".3g"), _pct(r.get("mfu")), str(r.get("config_hash"))]


def scaling_row(row: dict[str, Any]) -> list[str]:
    return [str(row["processes"]), f"{row['images_per_s']:.1f}", f"{row['images_per_s_per_gpu']:.1f}",
            f"{row['speedup']:.2f}x", _pct(row["efficiency"]), f"{1e3 * row['step_time_median_s']:.1f}",
            _pct(row["data_wait_fraction"])]


def _rich_table(title: str, columns: tuple[str, ...], rows: list[list[str]]):
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in ("run", "device", "config") else "right")
    for row in rows:
        table.add_row(*row)
    return table


def print_runs(records: list[dict[str, Any]]) -> None:
    """Console table of train/infer records of one device (named in the title, not in a column)."""
    from rich.console import Console

    keep = [i for i, col in enumerate(RUN_COLUMNS) if col not in _CONSOLE_DROP]
    rows = [[run_row(r)[i] for i in keep] for r in records]
    title = f"distseg bench on {records[0]['device']['name']}"
    Console(width=max(Console().width, 120)).print(_rich_table(title, tuple(RUN_COLUMNS[i] for i in keep), rows))


def print_scaling(record: dict[str, Any]) -> None:
    """Console table of a scaling record."""
    from rich.console import Console

    title = f"scaling: {record['stage']} {record['backbone']} {record['size']}px, micro-batch {record['micro_batch']}"
    Console().print(_rich_table(title, SCALING_COLUMNS, [scaling_row(r) for r in record["rows"]]))


def _markdown(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return lines + ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]


def markdown(records: list[dict[str, Any]]) -> str:
    """The report page: every train/infer run, then one efficiency table per scaling sweep."""
    runs = [r for r in records if r["kind"] in ("train", "infer")]
    sweeps = [r for r in records if r["kind"] == "scaling"]
    lines = ["# distseg benchmarks", "",
             "images/s counts labelled images per optimizer step (ssl also reads as many unlabelled ones × ratio); "
             "data-wait is the share of wall time blocked on the loader; MFU = achieved model TFLOPS / peak.", ""]
    if runs:
        lines += ["## Runs", "", *_markdown(RUN_COLUMNS, [run_row(r, with_tag=True) for r in runs]), ""]
    for s in sweeps:
        title = (f"## Scaling: {s['stage']} {s['backbone']} {s['size']}px, micro-batch {s['micro_batch']}, "
                 f"{s['device']['name']} ({s['tag']})")
        lines += [title, "", *_markdown(SCALING_COLUMNS, [scaling_row(r) for r in s["rows"]]), ""]
    return "\n".join(lines)


def chart(records: list[dict[str, Any]], path: Path) -> None:
    """PNG: images/s by configuration (bars) and images/s against processes for each scaling sweep (with ideal)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in records if r["kind"] in ("train", "infer") and r.get("status") == "ok"]
    sweeps = [r for r in records if r["kind"] == "scaling"]
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(13, max(3.5, 0.35 * len(runs) + 1.5)),
                                      gridspec_kw={"width_ratios": [3, 2]})
    labels = [f"{run_label(r)} ×{r['world_size']} mb{r['micro_batch']} {r['precision']}"
              + (f" ({r['tag']})" if r.get("tag") else "") for r in runs]
    bars.barh(range(len(runs)), [r["images_per_s"] for r in runs], color="tab:blue")
    bars.set_yticks(range(len(runs)), labels, fontsize=7)
    bars.invert_yaxis()
    bars.set_xlabel("images / s (whole job)")
    bars.set_title("throughput by configuration")
    for s in sweeps:
        procs = [row["processes"] for row in s["rows"]]
        ips = [row["images_per_s"] for row in s["rows"]]
        label = f"{s['stage']} {s['backbone']} mb{s['micro_batch']} ({s['tag']})"
        line = lines.plot(procs, ips, marker="o", label=label)[0]
        lines.plot(procs, [ips[0] * p / procs[0] for p in procs], linestyle="--", color=line.get_color(), alpha=0.5)
    lines.set_xticks(sorted({row["processes"] for s in sweeps for row in s["rows"]}) or [1])
    lines.set_xlabel("processes")
    lines.set_ylabel("images / s")
    lines.set_title("scaling (dashed: ideal)" if sweeps else "scaling (no sweeps recorded)")
    if sweeps:
        lines.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(records: list[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """Write ``out.md`` and ``out.png``; returns both paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md, png = out.with_suffix(".md"), out.with_suffix(".png")
    md.write_text(markdown(records))
    chart(records, png)
    return md, png
