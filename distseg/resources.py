"""Files that ship inside the package: the DeepSpeed configs and the recipes (with their class maps).

They live in ``distseg/ds_configs`` and ``distseg/recipes`` (the repository's top-level ``ds_configs/`` and
``recipes/`` point there), and are read through :mod:`importlib.resources`, so they work from any working directory
and after a non-editable ``pip install``.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

FOLDERS = ("ds_configs", "recipes")


def folder(name: str) -> Path:
    """The shipped folder ``name`` as a filesystem path (the package is installed as files, not a zip)."""
    if name not in FOLDERS:
        raise KeyError(f"no shipped folder {name!r}; shipped: {FOLDERS}")
    return Path(str(importlib.resources.files("distseg") / name))


def shipped(name: str, path: str | Path) -> Path | None:
    """The shipped file for ``path``: as given below the folder (``ds_configs/x.json``) or by its bare file name;
    None when the package ships no such file."""
    base = folder(name)
    path = Path(path)
    parts = path.parts[1:] if path.parts and path.parts[0] == name else path.parts
    for candidate in (base.joinpath(*parts) if parts else None, base / path.name):
        if candidate is not None and candidate.is_file():
            return candidate
    return None
