"""The stage folder: created once, re-opened only by ``--resume`` of the same run."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from distseg.engine import checkpoint as ckpt
from distseg.engine.distributed import DistEnv, barrier
from distseg.stages.common import StageError


def same_run(saved: dict[str, Any], identity: dict[str, Any]) -> bool:
    """Whether a stage record was written by the run ``identity`` describes (``StageConfig.identity``).

    The one rule for "same run": ``--resume`` here and ``distseg run``'s skip/resume decision both use it.
    """
    return saved.get("identity") == identity


def prepare_folder(out: str, record: dict[str, Any], env: DistEnv, *, resume: bool, force: bool) -> Path:
    """Create (or re-open for --resume) a run folder; refuses to damage an existing run by accident.

    Every rank runs the checks (so all raise together instead of hanging in a barrier); rank 0 alone writes.
    """
    if not out:
        raise StageError("no output folder given (--out)")
    folder = Path(out)
    existing = folder / ckpt.STAGE_JSON
    reopen = resume and existing.is_file()
    if reopen and not same_run(ckpt.read_stage(folder), record["identity"]):
        raise StageError(f"{folder}: --resume with a different config or process count than the run was started "
                         f"with; use a new --out or the original settings")
    if not reopen and folder.exists() and any(folder.iterdir()) and not force:
        hint = "pass --resume to continue it, or --force to start over" if existing.is_file() else \
            "choose another --out or pass --force"
        raise StageError(f"{folder}: exists and is not empty; {hint}")
    barrier()
    if env.is_main:
        if not reopen:
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        if not reopen:
            ckpt.write_json_atomic(existing, record)
    barrier()
    return folder
