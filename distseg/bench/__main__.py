"""``deepspeed --num_gpus N --module distseg.bench train ...``: the benchmark commands as a module for launchers.

The deepspeed launcher puts ``--local_rank=N`` before the subcommand (and also exports LOCAL_RANK), which a
command group cannot accept there; it is moved into the environment instead.
"""
from __future__ import annotations

import os
import sys


def _take_local_rank(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` / ``--local-rank=N`` from ``argv``, keeping N as LOCAL_RANK if none is set."""
    kept = []
    for arg in argv:
        name, _, value = arg.partition("=")
        if name in ("--local_rank", "--local-rank") and value:
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            kept.append(arg)
    return kept


def main() -> None:
    from distseg.commands.bench import app

    app(args=_take_local_rank(sys.argv[1:]), prog_name="python -m distseg.bench")


if __name__ == "__main__":
    main()
