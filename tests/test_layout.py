"""The code's shape, as the developers' guide and issue 11 fix it: modules split before ~600 lines,
server functions before ~80, the trainer never importing the server, and the guide's numbers in a
module that rules, plans and dataset checks all import (so none of them imports another's rules)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 600
MAX_SERVER_FUNCTION_LINES = 80


def sources(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (REPO / folder).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_module_is_over_600_lines():
    long = {}
    for path in sources("server", "training"):
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES:
            long[str(path.relative_to(REPO))] = lines
    assert long == {}


def test_no_server_function_is_over_80_lines():
    long = {}
    for path in sources("server"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_SERVER_FUNCTION_LINES:
                    long[f"{path.relative_to(REPO)}:{node.name}"] = lines
    assert long == {}


def test_the_trainer_never_imports_the_server():
    offenders = [
        str(path.relative_to(REPO))
        for path in sources("training")
        if any(name == "server" or name.startswith("server.") for name in imported_modules(path))
    ]
    assert offenders == []


def test_plans_and_dataset_checks_do_not_import_the_rules():
    """The guide's tables live in training/guide.py: plans and dataset checks read them there, not
    from training/diagnostics/ (which itself reads training/data/: a folder-level cycle)."""
    readers = [REPO / "training" / "plans.py", *sources("training/data")]
    offenders = [
        str(path.relative_to(REPO))
        for path in readers
        if any(name.startswith("training.diagnostics") for name in imported_modules(path))
    ]
    assert offenders == []
