"""The command line of every stage kind, derived from the registry.

``launch/<script>.py`` is one line around :func:`main`, and ``python -m distseg.stages KIND`` (also
``deepspeed --module distseg.stages KIND`` and ``torchrun -m distseg.stages KIND``) runs any registered kind without
a script. Works unchanged under ``deepspeed`` (which passes ``--local_rank=N``), ``torchrun`` (LOCAL_RANK in the
environment) and a plain ``python`` process.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from distseg.errors import fail, user_errors  # noqa: F401  (re-exported: the stage commands' error contract)


def build_config(kind: str, config_file: Path | None, options: dict[str, Any], sets: list[str]):
    """StageConfig from an optional YAML/JSON file, then explicit options, then ``--set key=value`` overrides."""
    from distseg.config import apply_overrides, from_dict, read_mapping, set_dotted
    from distseg.stages.config import StageConfig

    data = read_mapping(config_file) if config_file else {}
    data["kind"] = kind
    for dotted, value in options.items():
        if value is not None:
            set_dotted(data, dotted, value)
    data = apply_overrides(data, sets)
    return from_dict(StageConfig, data, where=str(config_file or "stage options"))


def make_app(kind: str) -> typer.Typer:
    """A Typer app running stage ``kind``; which options apply comes from the kind's registry entry."""
    from distseg.stages.registry import get_kind

    spec = get_kind(kind)
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                      help=f"Run a '{kind}' stage: {spec.summary} (one rank; launch with deepspeed/torchrun for "
                           f"several).")

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
        unlabeled: list[str] = typer.Option([], "--unlabeled", help="Unlabelled shard folder of the pool "
                                                                    "(repeatable; kinds that read a pool)."),
        unlabeled_fraction: Optional[float] = typer.Option(None, "--unlabeled-fraction",
                                                           help="Fraction of the unlabelled pool."),
        sets: list[str] = typer.Option([], "--set", help="Override any config field: a.b=value (repeatable)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint."),
        force: bool = typer.Option(False, "--force", help="Overwrite a non-empty --out."),
        local_rank: Optional[int] = typer.Option(None, "--local_rank", "--local-rank", hidden=True),
        device: Optional[str] = typer.Option(None, "--device", help="'cpu' to ignore CUDA."),
    ) -> None:
        from distseg.errors import reported
        from distseg.stages.trainer import run_stage
        from distseg.supervise import start_watchdog

        start_watchdog()
        if not spec.unlabelled and (unlabeled or unlabeled_fraction):
            fail(f"--unlabeled/--unlabeled-fraction do not apply to a {kind} stage (it reads no unlabelled pool)")
        options = {"out": out, "data.shards": data, "parent": parent, "ds_config": ds_config,
                   "micro_batch": micro_batch, "grad_accum": grad_accum, "global_batch": global_batch,
                   "train.steps": steps, "data.unlabeled": list(unlabeled) or None,
                   "data.unlabeled_fraction": unlabeled_fraction}
        with reported():
            cfg = build_config(kind, config, options, sets)
            run_stage(spec, cfg, resume=resume, force=force, local_rank=local_rank, device=device)

    return app


def main(kind: str, argv: list[str] | None = None, prog: str | None = None) -> None:
    """Entry point of ``launch/<script>.py`` and of ``python -m distseg.stages KIND``: the kind's own command, or
    the training-stage command line. A clean end ends the process's groups here, once: the commands themselves
    may run one after another in one process (on the same group)."""
    from distseg.engine.distributed import shutdown
    from distseg.stages.registry import get_kind

    app = get_kind(kind).command or make_app(kind)
    try:
        app(args=argv if argv is not None else sys.argv[1:], prog_name=prog or f"distseg.stages {kind}")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
    shutdown()
