"""``distseg run RECIPE`` and ``distseg demo``: whole chains of stages from a recipe."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _parse_vars(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            _fail(f"--var {item!r}: expected NAME=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def _execute(action) -> dict:
    """Run ``action``; bad input becomes one error line and exit status 2, a failed stage its log tail and 1."""
    from distseg.config import ConfigError
    from distseg.data.errors import DataError
    from distseg.pipeline import RecipeError, StageFailed

    try:
        return action()
    except StageFailed as exc:
        typer.echo(exc.tail, err=True)
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    except (RecipeError, ConfigError, DataError) as exc:
        _fail(str(exc))
    return {}


def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see docs/recipes.md), or the name of a shipped recipe "
                                            "(demo, dubai_10pct, eh_mkd_ssl, eh_ablation, cityscapes_semi)."),
    out: Optional[str] = typer.Option(None, "--out", help="Run folder (default: the recipe's, else runs/<name>)."),
    var: list[str] = typer.Option([], "--var", help="Recipe variable NAME=VALUE (repeatable); beats the "
                                                    "environment and the recipe's vars."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print each stage's command; run nothing."),
) -> None:
    """Run a recipe's stages in order: skip finished ones, resume interrupted ones, then write results.md/.csv."""
    from distseg.pipeline import run_recipe

    variables = _parse_vars(var)
    _execute(lambda: run_recipe(recipe, variables=variables, out=out, dry_run=dry_run))


def demo(
    data: Optional[Path] = typer.Option(None, "--data", help="Folder with target/ and intermediate/, each holding "
                                                             "images/, masks/ and classes.yaml; "
                                                             "default: generate synthetic data."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the data, shards and stage folders."),
) -> None:
    """SKD vs MKD, each without and with SSL, on two small domains; prints the table and writes results.png."""
    from distseg.pipeline.demo import run_demo

    _execute(lambda: run_demo(data=data, out=out))
