"""The rooms and the arrows between them (docs/architecture.md), checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Which of our packages each package may import.  The CLI entry point alone sees
# every front end.
ALLOWED = {"bpf": set(), "cni_server": {"bpf"}, "plugin": {"bpf", "cni_server"}}
ENTRY_POINTS = {"cni_server/cli.py"}


def our_imports(path: Path) -> set[str]:
    """Top-level packages of ours that ``path`` imports (anywhere in it, lazily too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_the_rooms_below_it(package: str) -> None:
    wrong = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel in ENTRY_POINTS or "/api/" in rel:
            continue
        extra = our_imports(path) - ALLOWED[package] - {package}
        if extra:
            wrong[rel] = sorted(extra)
    assert not wrong, f"imports across the rooms (docs/architecture.md): {wrong}"
