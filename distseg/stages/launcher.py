"""The command line every stage launcher shares (``launch/<stage>.py`` is one line around :func:`make_app`).

Works unchanged under ``deepspeed`` (which passes ``--local_rank=N``), ``torchrun`` (LOCAL_RANK in the
environment) and a plain ``python`` process.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

STAGES = {"head": "distseg.stages.head", "distill": "distseg.stages.distill", "ssl": "distseg.stages.ssl"}


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def build_config(kind: str, config_file: Path | None, options: dict[str, Any], sets: list[str]):
    """StageConfig from an optional YAML/JSON file, then explicit options, then ``--set key=value`` overrides."""
    from distseg.config import apply_overrides, from_dict, read_mapping
    from distseg.stages.config import StageConfig

    data = read_mapping(config_file) if config_file else {}
    data["kind"] = kind
    for dotted, value in options.items():
        if value is not None:
            _set(data, dotted, value)
    data = apply_overrides(data, sets)
    return from_dict(StageConfig, data, where=str(config_file or "stage options"))


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def make_app(kind: str) -> typer.Typer:
    """A Typer app running stage ``kind``."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                      help=f"Run the '{kind}' stage (one rank; launch with deepspeed/torchrun for several).")

    @app.command()
    def main(
        out: str = typer.Option(..., "--out", help="Stage folder to write."),
        data: Optional[str] = typer.Option(None, "--data", help="Shard folder (with manifest.json)."),
        parent: Optional[str] = typer.Option(None, "--parent", "--teacher", "--init",
                                             help="Previous stage folder or weights file."),
        config: Optional[Path] = typer.Option(None, "--config", help="StageConfig YAML/JSON."),
        ds_config: Optional[str] = typer.Option(None, "--ds_config", "--ds-config", help="DeepSpeed JSON."),
        micro_batch: Optional[int] = typer.Option(None, "--micro-batch"),
        grad_accum: Optional[int] = typer.Option(None, "--grad-accum"),
        global_batch: Optional[int] = typer.Option(None, "--global-batch"),
        steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps."),
        unlabeled: Optional[str] = typer.Option(None, "--unlabeled", help="(ssl) Unlabelled shard folder."),
        unlabeled_fraction: Optional[float] = typer.Option(None, "--unlabeled-fraction",
                                                           help="(ssl) Fraction of the unlabelled pool."),
        sets: list[str] = typer.Option([], "--set", help="Override any config field: a.b=value (repeatable)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint."),
        force: bool = typer.Option(False, "--force", help="Overwrite a non-empty --out."),
        local_rank: Optional[int] = typer.Option(None, "--local_rank", "--local-rank", hidden=True),
        device: Optional[str] = typer.Option(None, "--device", help="'cpu' to ignore CUDA."),
    ) -> None:
        import importlib

        from distseg.config import ConfigError
        from distseg.data.errors import DataError
        from distseg.engine.checkpoint import CheckpointError
        from distseg.models.backbones import PretrainedWeightsError
        from distseg.models.weights import WeightsError
        from distseg.stages.common import StageError

        options = {"out": out, "data.shards": data, "parent": parent, "ds_config": ds_config,
                   "micro_batch": micro_batch, "grad_accum": grad_accum, "global_batch": global_batch,
                   "train.steps": steps, "ssl.unlabeled_shards": unlabeled,
                   "ssl.unlabeled_fraction": unlabeled_fraction}
        if kind != "ssl" and (unlabeled or unlabeled_fraction):
            _fail("--unlabeled/--unlabeled-fraction only apply to the ssl stage")
        try:
            cfg = build_config(kind, config, options, sets)
            importlib.import_module(STAGES[kind]).run(cfg, resume=resume, force=force, local_rank=local_rank,
                                                      device=device)
        except (ConfigError, StageError, DataError, CheckpointError, WeightsError, PretrainedWeightsError,
                FileNotFoundError) as exc:
            _fail(str(exc))

    return app


def main(kind: str, argv: list[str] | None = None) -> None:
    """Entry point of ``launch/<kind>.py``."""
    make_app(kind)(args=argv if argv is not None else sys.argv[1:], prog_name=f"launch/{kind}.py")
