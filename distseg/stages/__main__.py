"""``python -m distseg.stages KIND [options]``: run any registered stage kind (``eval`` too) without a script.

Also ``deepspeed --module distseg.stages KIND ...`` and ``torchrun -m distseg.stages KIND ...``. The deepspeed
launcher puts ``--local_rank=N`` before the kind; it is passed on to the stage's own options.
"""
from __future__ import annotations

import sys


def usage() -> str:
    """The help text: every registered kind with its one-line summary."""
    from distseg.stages.registry import all_kinds

    lines = ["usage: python -m distseg.stages KIND [OPTIONS]   (KIND --help for its options)", "", "kinds:"]
    lines += [f"  {k.name:<14} {k.summary}" for k in all_kinds()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Dispatch to the kind named by the first positional argument."""
    import os

    from distseg.resources import configure_threads

    configure_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # before torch is imported: OpenMP reads it once
    from distseg.lazy import unknown_name
    from distseg.stages.registry import kind_names

    argv = list(sys.argv[1:] if argv is None else argv)
    rank_args = [a for a in argv if a.startswith("--local_rank") or a.startswith("--local-rank")]
    rest = [a for a in argv if a not in rank_args]
    if not rest or rest[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if rest else 2)
    kind, args = rest[0], rest[1:] + rank_args
    if kind not in kind_names():
        print(f"error: {unknown_name(kind_names(), kind, 'stage kind')}", file=sys.stderr)
        raise SystemExit(2)
    from distseg.stages.launcher import main as run_kind

    run_kind(kind, args)


if __name__ == "__main__":
    main()
