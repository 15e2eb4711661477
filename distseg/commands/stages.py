"""Stage utilities that are commands of their own: the Fisher information of a finished stage."""
from __future__ import annotations

from typing import Optional

import typer


def fisher(
    stage: str = typer.Argument(..., help="Finished stage folder (model.safetensors + stage.json)."),
    data: Optional[str] = typer.Option(None, "--data", help="Shards the model was trained on (default: the stage's)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split to use (default: the stage's training split)."),
    batches: int = typer.Option(16, "--batches", help="Batches N averaged for the diagonal Fisher."),
    batch_size: int = typer.Option(8, "--batch-size"),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """(Re)compute a stage's diagonal Fisher information into STAGE/fisher.safetensors, for the next stage's EWC."""
    from distseg.config import from_dict
    from distseg.data.stream import StreamConfig
    from distseg.engine.checkpoint import CheckpointError, read_stage
    from distseg.errors import reported
    from distseg.fisher import fisher_for_stage

    with reported():
        config = read_stage(stage)["config"]
        try:
            stream = from_dict(StreamConfig, config["data"]["stream"], where=f"{stage}/stage.json")
            data, split = data or config["data"]["shards"], split or config["data"]["train_split"]
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{stage}/stage.json: incomplete stage record (no {exc})") from None
        path = fisher_for_stage(stage, data, split, stream, batches, batch_size=batch_size, device=device)
    typer.echo(f"wrote {path}")
