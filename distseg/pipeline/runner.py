"""``distseg run``: build datasets, run the stages in order, then write the results table and figure."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from distseg.config import to_dict
from distseg.engine.runlog import PLAIN_EVERY_S, progress_line
from distseg.pipeline.launch import LOG_NAME, decide, log_tail, run_process, write_stage_config
from distseg.pipeline.plan import Plan, PlannedStage, build_plan
from distseg.pipeline.recipe import RecipeError, load_recipe, locate_recipe
from distseg.pipeline.results import (collect_rows, load_timings, rich_table, save_timings, stage_timing,
                                     write_results)


class StageFailed(RuntimeError):
    """A stage process exited with an error; the chain stopped there."""

    def __init__(self, stage: str, returncode: int, log: Path, tail: str) -> None:
        super().__init__(f"stage {stage!r} failed (exit status {returncode}); log: {log}")
        self.stage, self.returncode, self.log, self.tail = stage, returncode, log, tail


def _shards_current(path: Path, options: dict[str, Any]) -> bool:
    """Whether ``path`` already holds shards written with these options."""
    import json

    manifest = path / "manifest.json"
    if not manifest.is_file():
        return False
    saved = json.loads(manifest.read_text()).get("options", {})
    return all(saved.get(k) == v for k, v in options.items())


def wait_for_datasets(plan: Plan, console, timeout: float = 3600.0, poll: float = 5.0) -> None:
    """A following node of a multi-node run: wait until the leader has written every dataset's shards."""
    import time

    pending = {n: ds for n, ds in plan.recipe.datasets.items() if ds.shard is not None}
    deadline = time.monotonic() + timeout
    while pending:
        pending = {n: ds for n, ds in pending.items() if not _shards_current(Path(ds.path), ds.shard.layout())}
        if not pending:
            return
        if time.monotonic() > deadline:
            raise RecipeError(f"{plan.source}: node 0 did not shard {sorted(pending)} within {timeout:.0f} s")
        console.print(f"waiting for node 0 to shard {sorted(pending)}")
        time.sleep(poll)


def build_datasets(plan: Plan, console) -> None:
    """Shard every dataset that has a ``shard`` block and is not already sharded with the same options."""
    from distseg.data.shard import shard_dataset
    from distseg.data.synthetic import write_dataset

    for name, ds in plan.recipe.datasets.items():
        spec, synth = ds.shard, ds.synthetic
        if synth is not None and not Path(spec.classes).is_file():
            console.print(f"[bold]generating[/] {synth.images} synthetic {synth.domain!r} scenes for {name!r}")
            write_dataset(Path(spec.classes).parent, synth.images, synth.size, synth.domain, seed=synth.seed)
        if spec is None or _shards_current(Path(ds.path), spec.layout()):
            continue
        console.print(f"[bold]sharding[/] dataset {name!r} -> {ds.path}")
        shard_dataset(ds.path, **to_dict(spec), force=True, command=["distseg", "run", str(plan.source)],
                      progress=console.is_terminal)


def print_plan(plan: Plan, console, stages: list[PlannedStage]) -> None:
    """The dry-run listing: each of ``stages``' decision and command."""
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    for name, ds in plan.recipe.datasets.items():
        if ds.shard is not None:
            console.print(f"# dataset {name}: distseg shard-data -> {ds.path}", markup=False, highlight=False)
    rerun: set[str] = set()
    for stage in stages:
        decision = decide(stage, stage.spec.parent in rerun)
        if decision.action not in ("skip", "refuse"):
            rerun.add(stage.name)
        flags = " ".join(decision.flags)
        note = f"  # {decision.action}" + (f": {decision.reason}" if decision.reason else "")
        console.print(f"{stage.display} {flags}".rstrip() + note, markup=False, highlight=False, soft_wrap=True)


class PlainProgress:
    """The stages' progress where a bar cannot be drawn (a batch job's output file, ``nohup``, a pipe), with the
    calls ``run_stages`` makes on a rich ``Progress``: a plain line (:func:`~distseg.engine.runlog.progress_line`)
    for every change of a stage's state, and the running stage's step at most every ``every_s`` seconds."""

    def __init__(self, console, every_s: float = PLAIN_EVERY_S) -> None:
        self.console, self.every_s = console, every_s
        self.tasks: list[dict[str, Any]] = []

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: int, info: str = "") -> int:
        self.tasks.append({"name": description, "total": total, "completed": 0, "info": info,
                           "start": time.monotonic(), "printed": float("-inf"), "first": None})
        return len(self.tasks) - 1

    def update(self, task: int, completed: int | None = None, info: str | None = None) -> None:
        t, now = self.tasks[task], time.monotonic()
        new_state = info is not None and info != t["info"] and completed in (None, t["completed"])
        reached = completed is not None and completed >= t["total"] > t["completed"]  # once, not at every poll
        if completed is not None:
            if t["first"] is None and completed > 0:
                t["first"] = (now, completed)
            t["completed"] = completed
        t["info"] = info if info is not None else t["info"]
        if new_state or reached or now - t["printed"] >= self.every_s:
            t["printed"] = now
            elapsed, done = (now - t["first"][0], t["completed"] - t["first"][1]) if t["first"] else (0.0, 0)
            text = progress_line(t["name"], t["completed"], t["total"], t["info"], elapsed, done)
            self.console.print(text, markup=True, highlight=False, soft_wrap=True)


def run_stages(plan: Plan, console, stages: list[PlannedStage]) -> None:
    """Run every one of ``stages`` that needs it, in order; raise StageFailed (with the log tail) at the first
    failure."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    timings = load_timings(plan.run_dir)
    rerun: set[str] = set()
    columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}"))
    leader = plan.recipe.launch.leader
    node = "" if leader else f".node{plan.recipe.launch.node_rank}"
    live = Progress(*columns, console=console, transient=False) if console.is_terminal else PlainProgress(console)
    with live as progress:
        for stage in stages:
            decision = decide(stage, stage.spec.parent in rerun)
            steps = stage.config.train.steps if stage.config is not None else 1
            task = progress.add_task(f"{stage.name} ({stage.kind})", total=steps, info=decision.reason)
            if decision.action == "skip":
                progress.update(task, completed=steps, info=f"skipped: {decision.reason}")
                continue
            if decision.action == "refuse":
                raise RecipeError(f"{plan.source}: stage {stage.name!r}: {decision.reason}")
            if leader:
                write_stage_config(stage)
            log = plan.run_dir / "logs" / f"{stage.name}{node}.log"
            code, seconds, cpu = run_process(stage, decision, log, progress, task, plan.recipe.nproc)
            if code != 0:
                progress.update(task, info=f"[red]failed (exit {code})")
                raise StageFailed(stage.name, code, log, log_tail(log))
            rerun.add(stage.name)
            if leader:
                timings[stage.name] = stage_timing(stage.folder, seconds, cpu)
                save_timings(plan.run_dir, timings)
            progress.update(task, completed=steps, info=f"done in {seconds:.0f} s ({cpu:.0f} CPU s)")


def finish(plan: Plan, console) -> dict[str, Any]:
    """results.md, results.csv and results.png for every evaluated stage."""
    from distseg.pipeline.figure import write_figure

    rows = collect_rows(plan)
    out: dict[str, Any] = {"rows": rows}
    if not rows:
        return out
    title = f"{plan.recipe.name}: test-split results"
    out["md"], out["csv"] = write_results(rows, plan.run_dir, title, plan.recipe.baseline)
    console.print(rich_table(rows, title, plan.recipe.baseline), width=max(console.width, 160))  # a wide table beats a wrapped one
    out["figure"], left_out = write_figure(plan, plan.run_dir / "results.png", plan.recipe.figure_tiles)
    for line in left_out:
        console.print(f"results.png leaves out {line}", markup=False, highlight=False, soft_wrap=True)
    written = [str(p) for p in (out["md"], out["csv"], out["figure"]) if p]
    console.print("wrote " + ", ".join(written))
    return out


def results_console():
    """A rich console that keeps the results table readable when the output is a log file or a pipe.

    Rich assumes 80 columns when stdout is not a terminal, which squeezes a table of per-class IoUs into ellipses.
    """
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def run_recipe(path: str | Path, *, variables: dict[str, str] | None = None, out: str | None = None,
               dry_run: bool = False, console=None, launch: list[str] | None = None,
               only: list[str] | None = None) -> dict[str, Any]:
    """Validate the recipe completely, then (unless ``dry_run``) shard, train, evaluate and tabulate.

    ``only``: stage-name patterns (:meth:`Plan.selected`); the other stages are left as they are, and the table
    still has a row for every evaluated stage, so a run of some rows adds to the table of earlier runs.

    The run folder is locked for the whole run (a second ``distseg run`` on it is refused, naming this one).
    Returns ``{"plan", "rows", "md", "csv", "figure"}`` (only ``plan`` on a dry run; only ``plan`` on a node
    other than 0 of a multi-node torchrun run, which trains but leaves the results to node 0).
    """
    import shlex

    from distseg.folders import LOCK_NAME, FolderLock

    console = console or results_console()
    path = locate_recipe(path)
    recipe = load_recipe(path, variables, out, launch)
    plan = build_plan(recipe, path, require_inputs=not dry_run)
    stages = plan.selected(only or [])
    if dry_run:
        print_plan(plan, console, stages)
        return {"plan": plan}
    leader = recipe.launch.leader
    lock_name = LOCK_NAME if leader else f"{LOCK_NAME}.node{recipe.launch.node_rank}"
    with FolderLock(plan.run_dir, lock_name):
        console.print(f"[bold]{recipe.name}[/]: {len(stages)} stages -> {plan.run_dir}  "
                      f"(logs: <stage>/{LOG_NAME})")
        console.print(f"TensorBoard: tensorboard --logdir {shlex.quote(str(plan.run_dir))}", markup=False,
                      highlight=False, soft_wrap=True)
        if leader:
            build_datasets(plan, console)
        else:
            wait_for_datasets(plan, console)
        run_stages(plan, console, stages)
        return {"plan": plan, **(finish(plan, console) if leader else {})}
