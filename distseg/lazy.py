"""Registries as data: a table of ``name -> module path`` whose entries are imported on first use.

Listing names costs no import (``distseg --help`` and config checks stay fast, and a kind's heavy dependencies load
only when that kind runs); the module's named constant is the entry, and its own ``name`` must match its key.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Any


def unknown_name(names: Iterable[str], name: str, what: str) -> str:
    """The one wording of an unknown registry name, listing the accepted ones, so every caller that checks a name
    (config reading, command lines, the lookup itself) says the same thing."""
    return f"unknown {what} {name!r}; registered: {list(names)}"


def lazy_entry(table: Mapping[str, str], name: str, attr: str, what: str, error: type[Exception]) -> Any:
    """``table[name]``'s module's ``attr``; an unknown name raises ``error`` listing the registered names, and an
    entry whose ``name`` differs from its key is a packaging bug (RuntimeError)."""
    if name not in table:
        raise error(unknown_name(table, name, what))
    entry = getattr(importlib.import_module(table[name]), attr)
    if entry.name != name:
        raise RuntimeError(f"{table[name]}.{attr} is named {entry.name!r}, registered as {name!r}")
    return entry
