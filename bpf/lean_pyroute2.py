"""Import pyroute2's netlink parts without the rest of the library.

pyroute2's package ``__init__`` imports every module it has (NDB, IPDB,
conntrack, nftables, nl80211, ipset, IPVS, plan9, devlink...: ~220 modules) to
export their names, and any ``import pyroute2.<x>`` runs it first.  The node
daemon uses only ``IPRoute``, ``AsyncIPRoute`` and ``NetlinkError``; the rest
cost 6 MiB of RSS on every node and ~60 ms of start-up.

:func:`install` puts the package into ``sys.modules`` without running its
``__init__``, so importing a submodule loads that submodule and what it
imports.  The package stays complete for any caller: the three names above
resolve to their submodules on first use, and a submodule is imported
when asked for as an attribute (``from pyroute2 import config``), and any other
name the package exports runs the real ``__init__`` once (PEP 562's module ``__getattr__``), so
``from pyroute2 import NDB`` still works, at the old cost.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

PACKAGE = "pyroute2"
# The names the package exports that the daemon uses, and the submodule that defines each.
LEAN = {
    "IPRoute": "pyroute2.iproute",
    "AsyncIPRoute": "pyroute2.iproute",
    "NetlinkError": "pyroute2.netlink.exceptions",
}


def install() -> None:
    """Make ``pyroute2`` importable without its ``__init__``; a no-op once it is imported
    (by us or anyone) or when it is not installed."""
    if PACKAGE in sys.modules:
        return
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader
    state = {"complete": False}

    def __getattr__(name: str) -> Any:  # the module hook of PEP 562
        if name in LEAN:
            return getattr(importlib.import_module(LEAN[name]), name)
        if importlib.util.find_spec(f"{PACKAGE}.{name}") is not None:  # a submodule
            return importlib.import_module(f"{PACKAGE}.{name}")
        if not state["complete"] and not name.startswith("__"):
            state["complete"] = True
            loader.exec_module(package)  # the package's own __init__, into this module
            if name in package.__dict__:
                return package.__dict__[name]
        raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}")

    package.__dict__["__getattr__"] = __getattr__
    sys.modules[PACKAGE] = package

