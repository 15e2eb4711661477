"""Evaluate a stage folder or weights file: `deepspeed launch/evaluate.py RUN_DIR --data SHARDS [--split val]`."""
import os
import sys
from typing import Optional

# launch/ssl.py would shadow the standard library ssl module.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import typer  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    model: str = typer.Argument(..., help="Stage folder, or a weights file with --model-config and --classes."),
    data: str = typer.Option(..., "--data", help="Shard folder."),
    split: str = typer.Option("val", "--split"),
    sliding: bool = typer.Option(True, "--sliding/--no-sliding", help="Also evaluate with sliding windows."),
    tile: int = typer.Option(512, "--tile"),
    overlap: float = typer.Option(0.25, "--overlap"),
    batch_size: int = typer.Option(4, "--batch-size"),
    out: Optional[str] = typer.Option(None, "--out", help="Folder for eval.json (default: the stage folder)."),
    model_config: Optional[str] = typer.Option(None, "--model-config"),
    classes: Optional[str] = typer.Option(None, "--classes"),
    local_rank: Optional[int] = typer.Option(None, "--local_rank", "--local-rank", hidden=True),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    from distseg.config import ConfigError
    from distseg.data.errors import DataError
    from distseg.engine.checkpoint import CheckpointError
    from distseg.stages.common import StageError
    from distseg.stages.evaluate import run

    try:
        run(model, data, split=split, sliding=sliding, tile=tile, overlap=overlap, batch_size=batch_size, out=out,
            model_config=model_config, classes=classes, local_rank=local_rank, device=device)
    except (ConfigError, StageError, DataError, CheckpointError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)


if __name__ == "__main__":
    app()
