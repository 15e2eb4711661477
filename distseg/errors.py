"""The command-line error contract: bad input, or a disk that refuses a write, is one ``error:`` line and exit 2.

Every command reports the same exception types the same way (:func:`reported`): a :class:`UserError` (bad input) or
an ``OSError`` (a missing file, an unwritable or full disk) never shows a traceback, and a bug still does.
"""
from __future__ import annotations

import contextlib
import errno
import os
from typing import Iterator


class UserError(Exception):
    """Bad input, reported as one line: the base of every error whose message names the file and the problem
    (a config, a shard folder, a stage folder, a checkpoint, weights, a recipe...). Modules at every layer derive
    their errors from it, so this module imports none of them."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input or a failing file system, not a bug."""
    return (UserError, OSError)


def describe(exc: BaseException) -> str:
    """One line for an error: an OSError names its path and the system's reason (with what to do on a full disk)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else "write"
        text = f"{where}: {exc.strerror}"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            text += " (free space, or choose an output folder on another disk)"
        return text
    return " ".join(str(exc).split()) or type(exc).__name__


def fail(message: str) -> None:
    """Print ``error: message`` once (rank 0 under a launcher) and exit with status 2."""
    import typer

    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Turn any :func:`user_errors` raised inside into the one-line report and exit status 2."""
    try:
        yield
    except user_errors() as exc:
        fail(describe(exc))
