"""``distseg run RECIPE`` and ``distseg demo``: whole chains of stages from a recipe."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from distseg.resources import shipped_recipes


def _parse_vars(items: list[str]) -> dict[str, str]:
    from distseg.errors import fail

    out = {}
    for item in items:
        if "=" not in item:
            fail(f"--var {item!r}: expected NAME=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def _execute(action) -> dict:
    """Run ``action``; bad input becomes one error line and exit status 2, a failed stage its log tail and 1, a
    SIGINT/SIGTERM (after the stage was stopped) one line and 128 + the signal number."""
    import signal

    from distseg.errors import reported
    from distseg.pipeline import StageFailed
    from distseg.supervise import Interrupted, raise_on_terminate

    try:
        with raise_on_terminate(), reported():
            return action()
    except StageFailed as exc:
        typer.echo(exc.tail, err=True)
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    except (KeyboardInterrupt, Interrupted) as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        typer.echo(f"error: stopped by {signal.Signals(signum).name}; the running stage was stopped too (run the "
                   f"same command to resume)", err=True)
        raise typer.Exit(128 + signum)


def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see docs/recipes.md), or the name of a shipped recipe "
                                            f"({', '.join(shipped_recipes())})."),
    out: Optional[str] = typer.Option(None, "--out", help="Run folder (default: the recipe's, else runs/<name>)."),
    var: list[str] = typer.Option([], "--var", help="Recipe variable NAME=VALUE (repeatable); beats the "
                                                    "environment and the recipe's vars."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print each stage's command; run nothing."),
    launch: list[str] = typer.Option([], "--launch", help="Multi-node setting KEY=VALUE of the recipe's launch: "
                                                          "block (repeatable): num_nodes, hostfile, master_addr, "
                                                          "master_port, node_rank, rdzv_endpoint, rdzv_id, ..."),
    only: list[str] = typer.Option([], "--only", help="Run only these stages (repeatable; comma-separated or "
                                                      "shell patterns: 'ft' is every seed's ft, 'ft.s1' one, "
                                                      "'eval_ft*'), with the ancestors they start from. The "
                                                      "table still lists every evaluated stage."),
) -> None:
    """Run a recipe's stages in order: skip finished ones, resume interrupted ones, then write results.md/.csv."""
    from distseg.pipeline import run_recipe

    variables = _parse_vars(var)
    patterns = [p.strip() for item in only for p in item.split(",") if p.strip()]
    _execute(lambda: run_recipe(recipe, variables=variables, out=out, dry_run=dry_run, launch=launch,
                                only=patterns))


def demo(
    data: Optional[Path] = typer.Option(None, "--data", help="Folder with target/ and intermediate/, each holding "
                                                             "images/, masks/ and classes.yaml; "
                                                             "default: generate synthetic data."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the data, shards and stage folders."),
) -> None:
    """SKD vs MKD, each without and with SSL, on two small domains; prints the table and writes results.png."""
    from distseg.pipeline.demo import run_demo

    _execute(lambda: run_demo(data=data, out=out))
