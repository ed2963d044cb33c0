"""The rooms and the arrows between them (docs/architecture.md), checked on the source."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
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


def test_the_daemon_loads_only_the_parts_of_its_libraries_it_uses_and_the_rest_still_works(
        ) -> None:
    """pyroute2's package __init__ imports ~220 modules (6 MiB on every node) and
    prometheus-client's an HTTP stack (~4 MiB); the daemon's imports leave them
    out, and both packages still answer every name."""
    code = """if True:
        import json, sys
        import cni_server.cli, plugin.kubernetes
        unused = ("pyroute2.ndb.main", "pyroute2.ipdb", "pyroute2.conntrack",
                  "pyroute2.netlink.nl80211", "pyroute2.plan9", "prometheus_client.exposition",
                  "http.server", "wsgiref", "email")
        loaded = [m for m in unused if m in sys.modules]
        from importlib.metadata import version  # (imports email)
        from pyroute2 import AsyncIPRoute, IPRoute, NetlinkError
        with IPRoute() as ipr:
            links = len(ipr.get_links())
        from pyroute2 import config   # a submodule, asked for by name
        from pyroute2 import NDB      # any other name: the package's own __init__ runs
        import pyroute2
        try:
            pyroute2.no_such_name
            missing = False
        except AttributeError:
            missing = True
        from prometheus_client import CollectorRegistry, Gauge, generate_latest
        registry = CollectorRegistry()
        Gauge("g", "G", registry=registry).set(2)
        print(json.dumps({"loaded": loaded, "links": links, "ndb": NDB.__name__,
                          "prometheus": generate_latest(registry).decode().splitlines()[-1],
                          "full": "pyroute2.ndb.main" in sys.modules,
                          "version": pyroute2.__version__ == version("pyroute2"),
                          "config": config.__name__, "missing": missing,
                          "same": IPRoute is pyroute2.IPRoute}))
    """
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    result = json.loads(out)
    assert result.pop("links") >= 1  # lo, at least
    assert result == {"loaded": [], "ndb": "NDB", "full": True, "prometheus": "g 2.0",
                      "version": True, "config": "pyroute2.config", "missing": True,
                      "same": True}
