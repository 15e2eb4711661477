"""``distseg domain-gap``: rank candidate intermediate datasets by their measured closeness to a target.

Heavy modules (torch, timm, scikit-learn) are imported inside the command body, so ``distseg --help`` stays instant.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand


class ListOptionsCommand(TyperCommand):
    """Lets ``--candidates a b c`` take every value up to the next option, as the issue's command line reads.

    click options take a fixed number of values, so the arguments are rewritten to the repeated form
    (``--candidates a --candidates b --candidates c``) before click parses them.
    """

    list_options = ("--candidates", "--candidate-models")

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        out, current = [], None
        for arg in args:
            if arg in self.list_options:
                current = arg
                continue
            if arg.startswith("-") and arg != "-":
                current = None
            elif current is not None:
                out.append(current)
            out.append(arg)
        return super().parse_args(ctx, out)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def domain_gap(
    target: str = typer.Option(..., "--target", help="Shard folder of the target (FOLDER or FOLDER@split,split)."),
    candidates: list[str] = typer.Option(..., "--candidates", help="One or more shard folders of candidate "
                                                                   "intermediate datasets (FOLDER or "
                                                                   "FOLDER@split,split), space-separated."),
    encoder: str = typer.Option("imagenet", "--encoder", help="'imagenet' (the --backbone entry's ImageNet "
                                                              "weights) or a finished stage folder."),
    backbone: str = typer.Option("efficientnet_lite0", "--backbone", help="Backbone of the ImageNet encoder."),
    split: str = typer.Option("train,unlabeled", "--split", help="Splits read from folders given without @: "
                                                                 "those present, comma-separated."),
    tiles: int = typer.Option(500, "--tiles", help="At most this many tiles per dataset, drawn by seed."),
    size: int = typer.Option(224, "--size", help="Encoder input side; tiles are centre-cropped to it."),
    candidate_models: list[str] = typer.Option([], "--candidate-models",
                                               help="Stage folders trained on each candidate, in candidate order "
                                                    "('-' for none): adds LogME transferability."),
    label_split: str = typer.Option("train", "--label-split", help="Target split whose labels LogME scores."),
    synonyms: Optional[Path] = typer.Option(None, "--synonyms", help="YAML/JSON synonym table (each "
                                                                      "canonical class name maps to a list of "
                                                                      "synonyms) for label overlap."),
    permutations: int = typer.Option(200, "--permutations", help="Permutations of the MMD test."),
    embed_tiles: int = typer.Option(300, "--embed-tiles", help="Tiles per dataset in the t-SNE picture (0: none)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Tiles per encoder forward."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample, the permutations and the picture."),
    device: str = typer.Option("cpu", "--device", help="Torch device of the encoder."),
    threads: int = typer.Option(0, "--threads", help="CPU threads for torch (0: torch's default)."),
    out: Path = typer.Option(Path("domain_gap"), "--out", help="Folder for ranking.md/.csv, gap.json, "
                                                               "embedding.png."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out."),
) -> None:
    """Rank candidate intermediate datasets by closeness to a target: feature distances, label overlap,
    low-level statistics and (with --candidate-models) LogME; writes the table and a t-SNE picture."""
    from distseg.analysis import GapError
    from distseg.config import ConfigError
    from distseg.analysis.gap import GapConfig, analyse, thread_limit
    from distseg.analysis.report import check_out, print_report, write_report
    from distseg.data.errors import DataError
    from distseg.engine.checkpoint import CheckpointError
    from distseg.models.backbones import PretrainedWeightsError
    from distseg.models.weights import WeightsError

    try:
        cfg = GapConfig(target=target, candidates=list(candidates), encoder=encoder, backbone=backbone, split=split,
                        tiles=tiles, seed=seed, size=size, batch_size=batch_size, permutations=permutations,
                        embed_tiles=embed_tiles, candidate_models=list(candidate_models), label_split=label_split,
                        synonyms=str(synonyms) if synonyms else None, device=device,
                        threads=threads)
        check_out(out, force)
        with thread_limit(threads):
            result = analyse(cfg, progress=True)
            write_report(result, out, force=force)
    except (GapError, DataError, CheckpointError, ConfigError, WeightsError, PretrainedWeightsError) as exc:
        _fail(str(exc))
    print_report(result)
    typer.echo(f"wrote {out}/ranking.md, ranking.csv, gap.json" + (", embedding.png" if embed_tiles else ""))


domain_gap.typer_command_class = ListOptionsCommand
