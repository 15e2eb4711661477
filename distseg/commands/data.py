"""``distseg shard-data`` and ``distseg inspect``: turn image/mask folders into WebDataset shards.

Only typer and the standard library are imported here; the data modules (numpy, PIL, webdataset)
are imported inside the command bodies so ``distseg --help`` stays instant.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _fail(message: str) -> None:
    """Report bad input as one stderr line and exit with status 2 (the CLI convention)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _command_line(out: Path, options: dict[str, object]) -> list[str]:
    """The canonical command (every option spelled out) recorded in the manifest to repeat a run."""
    args = ["distseg", "shard-data", str(out)]
    for flag, value in options.items():
        if value is not None:
            args += [flag, str(value)]
    return args


def shard_data(
    out: Path = typer.Argument(..., help="Output folder for <split>-NNNNNN.tar shards and manifest.json."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of images (jpg/png/tif)."),
    masks: Optional[Path] = typer.Option(None, "--masks", help="Folder of masks paired with --images by file stem. "
                                         "Without it every image of --images is unlabelled."),
    unlabeled: Optional[Path] = typer.Option(None, "--unlabeled", help="Extra folder of unlabelled images."),
    classes: Optional[Path] = typer.Option(None, "--classes", help="Class map (YAML or JSON); required with --masks."),
    tile: Optional[int] = typer.Option(None, "--tile", help="Cut images into TILE x TILE crops (edges padded)."),
    overlap: int = typer.Option(0, "--overlap", help="Overlap in pixels between neighbouring tiles."),
    split: str = typer.Option("8:1:1", "--split", help="train:val:test ratio over source images or groups."),
    labeled_fraction: float = typer.Option(1.0, "--labeled-fraction",
                                           help="Fraction of train tiles that keep labels; the rest go to "
                                                "'unlabeled'."),
    group_by: Optional[str] = typer.Option(None, "--group-by", help="Regex on the file name; files with the same "
                                           "match (first group if any) stay in one split."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split and of the in-shard sample order."),
    shard_size: str = typer.Option("1000", "--shard-size",
                                   help="Target shard size: a sample count (1000) or a size (64MB)."),
    unknown: str = typer.Option("error", "--unknown", help="Mask values not in the class map: 'error' or 'ignore'."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT."),
) -> None:
    """Validate, tile, split and write a dataset as WebDataset shards with a manifest."""
    from distseg.data.errors import DataError
    from distseg.data.shard import shard_dataset

    try:
        manifest = shard_dataset(
            out=out, images=images, masks=masks, unlabeled=unlabeled, classes=classes, tile=tile,
            overlap=overlap, split=split, labeled_fraction=labeled_fraction, group_by=group_by, seed=seed,
            shard_size=shard_size, unknown=unknown, force=force, progress=True,
            command=_command_line(out, {"--images": images, "--masks": masks, "--unlabeled": unlabeled,
                                        "--classes": classes, "--tile": tile, "--overlap": overlap, "--split": split,
                                        "--labeled-fraction": labeled_fraction, "--group-by": group_by,
                                        "--seed": seed, "--shard-size": shard_size, "--unknown": unknown}))
    except DataError as exc:
        _fail(str(exc))
    counts = ", ".join(f"{name}: {s['samples']}" for name, s in manifest["splits"].items())
    typer.echo(f"wrote {len(manifest['shards'])} shards to {out} ({counts})")


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
