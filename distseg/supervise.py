"""Process hygiene of ``distseg run``: a stage never outlives the run that started it.

The run starts each stage launcher in a process group of its own (so a Ctrl-C in the terminal reaches only the run,
which then stops the stage on purpose) with a parent-death signal, and tells every stage rank who supervises it.
Three things then end a stage: the run stopping its group on SIGINT/SIGTERM (:func:`stop_group`), the kernel's
SIGTERM to the launcher when the run dies, and a watchdog thread in every rank that kills the rank once the
supervising run is gone or its own parent (the launcher) is, which covers ``kill -9`` of the run and launchers
such as torchrun that start their workers in sessions of their own. Standard library only (imported by the CLI).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Iterator

SUPERVISOR = "DISTSEG_SUPERVISOR_PID"
"""Environment variable naming the ``distseg run`` process that supervises a stage's ranks."""
_PR_SET_PDEATHSIG = 1


def supervised_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child whose ranks must die with this process."""
    return {**env, SUPERVISOR: str(os.getpid())}


def parent_death_signal():
    """A ``preexec_fn`` that makes the child receive SIGTERM when this process dies (Linux; a no-op elsewhere).

    The libc function is looked up here, before the fork, so the child only makes one C call before ``exec``.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a killed parent waiting to be reaped counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return True  # no /proc: existence is all we can tell


def start_watchdog(interval: float = 0.5) -> threading.Thread | None:
    """In a stage rank started by ``distseg run``: SIGKILL this process once the run or the launcher is gone.

    Does nothing for ranks started by hand (no :data:`SUPERVISOR` in the environment): a stage launched from a
    shell that then exits (``nohup``) must keep training.
    """
    supervisor = os.environ.get(SUPERVISOR)
    if not supervisor or not supervisor.isdigit():
        return None
    pid, parent = int(supervisor), os.getppid()

    def watch() -> None:
        while alive(pid) and os.getppid() == parent:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="distseg-watchdog", daemon=True)
    thread.start()
    return thread


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc: torchrun and distseg stages start sessions of their own, out of
    their parent's process group, so a group signal cannot reach them all."""
    from pathlib import Path

    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # nothing of the group is left


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the child's process group, give it ``grace`` seconds, SIGKILL whatever of the group is left (the
    launcher may have exited before its ranks) and reap the child."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


class Interrupted(Exception):
    """The run was asked to stop (SIGINT or SIGTERM); its stage has been stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def raise_on_terminate() -> Iterator[None]:
    """Inside: SIGTERM raises :class:`Interrupted` in the main thread (as SIGINT raises KeyboardInterrupt), so the
    code that runs a stage can stop it; the previous handler is restored afterwards."""

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred_stop() -> Iterator[list[int]]:
    """Inside: SIGINT and SIGTERM are only recorded (in the yielded list), not raised, so a stop request never
    interrupts the progress display halfway through one of its locks; the caller checks the list at a safe point and
    stops. The previous handlers are restored afterwards."""
    received: list[int] = []

    def handler(signum, frame):
        received.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
