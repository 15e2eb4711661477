"""The stage folder: created once, re-opened only by ``--resume`` of the same run, locked while a stage runs in it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from distseg.engine import checkpoint as ckpt
from distseg.engine.distributed import DistEnv, barrier, broadcast_object
from distseg.folders import FolderError, FolderLock, check_replaceable, clear_folder, user_entries
from distseg.stages.common import StageError


def same_run(saved: dict[str, Any], identity: dict[str, Any]) -> bool:
    """Whether a stage record was written by the run ``identity`` describes (``StageConfig.identity``).

    The one rule for "same run": ``--resume`` here and ``distseg run``'s skip/resume decision both use it.
    """
    return saved.get("identity") == identity


class PreparedFolder(NamedTuple):
    """What :func:`prepare_folder` decided, identically on every rank."""

    path: Path
    reopened: bool
    """True when ``--resume`` re-opened a folder of the same run (the loop then loads its checkpoint)."""
    lock: FolderLock | None
    """Rank 0's lock on the folder, held until the stage ends (None on other ranks)."""


def _decide(folder: Path, record: dict[str, Any], resume: bool, force: bool) -> bool:
    """Rank 0's checks: whether to re-open the folder; raises when the run must not touch it."""
    existing = folder / ckpt.STAGE_JSON
    reopen = resume and existing.is_file()
    if reopen and not same_run(ckpt.read_stage(folder), record["identity"]):
        raise StageError(f"{folder}: --resume with a different config or process count than the run was started "
                         f"with; use a new --out or the original settings")
    if not reopen and user_entries(folder):
        if not force:
            hint = "pass --resume to continue it, or --force to start over" if existing.is_file() else \
                "choose another --out or pass --force"
            raise StageError(f"{folder}: exists and is not empty; {hint}")
        check_replaceable(folder, ckpt.STAGE_JSON, "stage folder")
    return reopen


def prepare_folder(out: str, record: dict[str, Any], env: DistEnv, *, resume: bool, force: bool) -> PreparedFolder:
    """Lock, then create (or re-open for --resume) a stage folder; refuses to damage an existing run by accident.

    Rank 0 alone decides and writes; its decision or its error reaches every rank, so all ranks resume, start or
    raise together (a rank on another node, started with other flags, follows rank 0). ``--force`` replaces only a
    stage folder (one with ``stage.json``). A second process on the same folder is refused while the lock is held.
    """
    if not out:
        raise StageError("no output folder given (--out)")
    folder = Path(out)
    outcome: Any = None
    lock = None
    if env.is_main:
        try:
            if folder.exists() and not folder.is_dir():
                raise FolderError(f"{folder}: exists and is not a folder")
            _decide(folder, record, resume, force)  # a refused run writes nothing, not even the lock file
            lock = FolderLock(folder).acquire()
            reopen = _decide(folder, record, resume, force)  # again: the holder of the lock may have changed it
            if not reopen:
                clear_folder(folder)
                ckpt.write_json_atomic(folder / ckpt.STAGE_JSON, record)
            outcome = reopen
        except Exception as exc:  # every rank raises the same error instead of waiting in a barrier
            if lock is not None:
                lock.release()
            outcome = exc
    outcome = broadcast_object(outcome)
    if isinstance(outcome, BaseException):
        raise outcome
    barrier()
    return PreparedFolder(folder, bool(outcome), lock)
