"""The ``distseg`` command line.

Each command lives in ``distseg.commands.<area>``; those modules import only typer at import time
(torch, timm and deepspeed are imported inside the command bodies), so ``distseg --help`` is instant.
"""
from __future__ import annotations

import importlib

import typer

app = typer.Typer(help="Label-efficient land-cover segmentation: shard, distil, self-train, predict.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

# (module under distseg.commands, attribute, command name). Attributes that are typer.Typer objects
# become command groups (``distseg bench train``), functions become plain commands (parsed by their
# ``typer_command_class`` when they set one).
_COMMANDS: list[tuple[str, str, str]] = [
    ("data", "shard_data", "shard-data"),
    ("data", "inspect", "inspect"),
    ("stages", "fisher", "fisher"),
    ("predict", "predict", "predict"),
    ("models", "flops", "flops"),
    ("models", "bench_infer", "bench-infer"),
    ("run", "run", "run"),
    ("run", "demo", "demo"),
    ("bench", "app", "bench"),
    ("gap", "domain_gap", "domain-gap"),
]


def _register() -> None:
    for module, attr, name in _COMMANDS:
        obj = getattr(importlib.import_module(f"distseg.commands.{module}"), attr)
        if isinstance(obj, typer.Typer):
            app.add_typer(obj, name=name)
        else:
            app.command(name, cls=getattr(obj, "typer_command_class", None))(obj)


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point usable in-process (tests) as well as from the console script."""
    app(args=argv, prog_name="distseg")


if __name__ == "__main__":
    main()
