"""docs/reliability.md stays current: every test it names exists, and every fault test is named in it."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

DOC = REPO / "docs" / "reliability.md"
REFERENCE = re.compile(r"`(tests/test_\w+\.py)::(test_\w+)`")


def fault_test_files() -> list[Path]:
    """Where the fault tests live."""
    return sorted((REPO / "tests").glob("test_faults_*.py")) + [REPO / "tests" / "test_resume_matrix.py"]


def _test_names(path: Path) -> set[str]:
    """Names of the module-level test functions of a test file."""
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_test_named_in_the_reliability_table_exists():
    named = REFERENCE.findall(DOC.read_text())
    assert len(named) >= 30
    missing = [f"{path}::{name}" for path, name in named
               if not (REPO / path).is_file() or name not in _test_names(REPO / path)]
    assert not missing, missing


def test_every_fault_test_is_in_the_reliability_table():
    named = set(REFERENCE.findall(DOC.read_text()))
    files = fault_test_files()
    assert len(files) >= 4
    unlisted = [f"{path.relative_to(REPO)}::{name}" for path in files for name in sorted(_test_names(path))
                if (str(path.relative_to(REPO)), name) not in named]
    assert not unlisted, unlisted
