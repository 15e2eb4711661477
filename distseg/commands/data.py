"""``distseg shard-data`` and ``distseg inspect``: turn image/mask folders into WebDataset shards.

The options of ``shard-data`` are built from :class:`distseg.data.options.ShardOptions` (its only definition, a
light dataclass module); the heavy data modules (numpy, PIL) are imported inside the command bodies so
``distseg --help`` stays instant.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Any, Optional

import typer


def _fail(message: str) -> None:
    """Report bad input as one stderr line and exit with status 2 (the CLI convention)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _cli_type(hint: Any) -> Any:
    """The command-line type of a ShardOptions field: folders are paths, other optionals stay optional, a field
    that accepts a string as well (``shard_size``) is read as a string."""
    args = typing.get_args(hint)
    if str in args:
        return Optional[str] if type(None) in args else str
    if type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return Optional[inner]
    return hint


def _shard_parameters() -> list[inspect.Parameter]:
    """One typer option per ShardOptions field, with its default, flag and help (the single definition)."""
    from distseg.data.options import ShardOptions

    hints = typing.get_type_hints(ShardOptions)
    folders = {"images", "masks", "unlabeled", "classes"}
    params = []
    for f in dataclasses.fields(ShardOptions):
        tp = Optional[Path] if f.name in folders else _cli_type(hints[f.name])
        option = typer.Option(f.default, ShardOptions.flag(f.name), help=f.metadata["help"])
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=tp))
    return params


def shard_data(out: Path, force: bool, **options: Any) -> None:
    """Validate, tile, split and write a dataset as WebDataset shards with a manifest."""
    from distseg.data.shard import shard_dataset
    from distseg.errors import reported

    with reported():
        manifest = shard_dataset(out, force=force, progress=True, **options)
    counts = ", ".join(f"{name}: {s['samples']}" for name, s in manifest["splits"].items())
    typer.echo(f"wrote {len(manifest['shards'])} shards to {out} ({counts})")


shard_data.__signature__ = inspect.Signature([
    inspect.Parameter("out", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                      default=typer.Argument(..., help="Output folder for <split>-NNNNNN.tar shards and "
                                                       "manifest.json.")),
    *_shard_parameters(),
    inspect.Parameter("force", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                      default=typer.Option(False, "--force", help="Replace a non-empty OUT.")),
])


def inspect(
    shard_dir: Path = typer.Argument(..., help="A folder written by `distseg shard-data`."),
) -> None:
    """Print a shard folder's manifest as tables: splits, class pixel shares, shards."""
    from distseg.data.errors import DataError
    from distseg.data.manifest import print_manifest, read_manifest

    try:
        manifest = read_manifest(shard_dir)
    except DataError as exc:
        _fail(str(exc))
    print_manifest(manifest)
