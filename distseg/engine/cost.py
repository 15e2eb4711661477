"""What a stage's training costs, carried across interruptions.

A long stage runs in pieces: a session ends or a node is pre-empted, and ``--resume`` continues from the newest
checkpoint. Whoever launched the last piece can only time that piece, so a stage resumed twice would report a third
of its cost. Instead every checkpoint carries the cost of the steps it holds, a resumed run adds its own piece to
it, and ``stage.json`` ends with the cost of the whole schedule (``cost``):

- ``cpu_s``: CPU seconds of every rank's process tree (the rank, its data-loader workers, and whatever they have
  reaped), summed over ranks and pieces. On a machine shared with other work this is the steadier figure: wall
  time also measures the neighbours.
- ``wall_s``: the slowest rank's seconds since its process started, summed over pieces (imports, model build and
  data opening included: a resume pays them again).
- ``pieces``: one entry per process lifetime with the steps it contributed (``from_step`` to ``to_step``).
- ``complete``: whether the pieces go back to step 0. A checkpoint written before costs were recorded starts the
  list later; the figure then covers only the steps since.

Work done after a piece's last checkpoint is lost with it and not counted: the figure is what the schedule costs,
not what an interruption wasted.
"""
from __future__ import annotations

from typing import Any

import psutil

from distseg.engine.distributed import gather_objects
from distseg.engine.runlog import process_age


def process_tree_cpu() -> float:
    """User + system CPU seconds of this process since it started, of its live descendants, and of every process
    any of them has reaped (a process's time moves into its parent's ``children_*`` only once it is reaped, when it
    is no longer among the live ones, so nothing is counted twice)."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # a worker that exited while we looked
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


class StageCost:
    """The cost pieces a stage's checkpoints carry (see module docstring); one per rank, kept identical."""

    def __init__(self) -> None:
        self.pieces: list[dict[str, Any]] = []
        """Earlier pieces, restored from the checkpoint this run resumed from."""
        self.from_step = 0
        """The step this process started training from."""

    def resume_from(self, carried: dict[str, Any] | None, step: int) -> None:
        """Continue the cost a checkpoint at ``step`` carried (None: one written before costs were recorded)."""
        self.pieces = [dict(p) for p in (carried or {}).get("pieces", [])]
        self.from_step = step

    def snapshot(self, step: int) -> dict[str, Any]:
        """Collective: the cost of the steps up to ``step`` (earlier pieces and this process's so far)."""
        mine = gather_objects((process_tree_cpu(), process_age()))
        current = {"from_step": self.from_step, "to_step": step, "cpu_s": round(sum(c for c, _ in mine), 3),
                   "wall_s": round(max(w for _, w in mine), 3)}
        pieces = [*self.pieces, current]
        return {"cpu_s": round(sum(p["cpu_s"] for p in pieces), 3),
                "wall_s": round(sum(p["wall_s"] for p in pieces), 3),
                "complete": pieces[0]["from_step"] == 0, "pieces": pieces}
