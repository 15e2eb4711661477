"""Folders distseg owns: an exclusive lock per run or stage folder, and the one rule for what ``--force`` may delete.

A folder lock is an ``flock`` on ``FOLDER/.distseg.lock``, held for the life of the process that took it, so the
kernel releases it when that process dies, even by ``kill -9``. The file itself stays (deleting it would race with a
process about to open it) and names its holder, so a refused second invocation can say which process is in the way.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from distseg.errors import UserError

LOCK_NAME = ".distseg.lock"


class FolderError(UserError, ValueError):
    """A folder is in use by another process, or is not one that distseg may replace."""


class FolderLock:
    """An exclusive, process-lifetime lock on one folder (created if missing)."""

    def __init__(self, folder: str | Path, name: str = LOCK_NAME) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        """Take the lock or raise :class:`FolderError` naming the holder; never waits."""
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderError(f"{self.folder}: in use by {holder(self.path)}; wait for it to finish or stop it "
                              f"first") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (also happens when the process exits)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(path: Path) -> str:
    """Who holds a lock file, as written by :meth:`FolderLock.acquire` (best effort: it may be mid-write)."""
    try:
        info = json.loads(path.read_text())
        return f"process {info['pid']} on {info['host']} since {info['since']} ({info['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def user_entries(folder: Path) -> list[Path]:
    """What a folder holds besides distseg's lock file (an empty list for a missing folder)."""
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.name != LOCK_NAME]


def check_replaceable(folder: Path, marker: str, what: str) -> None:
    """``--force`` replaces only what distseg wrote: a non-empty ``folder`` must hold ``marker`` (``stage.json`` for a
    stage folder, ``manifest.json`` for shards), else nothing is deleted and :class:`FolderError` says why."""
    if folder.exists() and not folder.is_dir():
        raise FolderError(f"{folder}: exists and is not a folder")
    if user_entries(folder) and not (folder / marker).is_file():
        raise FolderError(f"{folder}: not a {what} (no {marker}); --force only replaces folders distseg wrote, so "
                          f"move it away or choose another output folder")


def clear_folder(folder: Path) -> None:
    """Delete everything in ``folder`` except its lock file (which the caller holds)."""
    for path in user_entries(folder):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
