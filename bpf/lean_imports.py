"""Import two libraries' parts without the rest of them.

pyroute2's package ``__init__`` imports every module it has (NDB, IPDB,
conntrack, nftables, nl80211, ipset, IPVS, plan9, devlink...: ~220 modules) to
export their names; the node daemon uses ``IPRoute``, ``AsyncIPRoute`` and
``NetlinkError``.  prometheus-client's imports its HTTP exposition module, and
with it http.server, urllib.request, wsgiref and email; the daemon uses the
registry and metric types and serves ``/metrics`` itself (``cni_server.health``).
Together they cost ~10 MiB of RSS on every node and ~80 ms of start-up.

:func:`install` puts such a package into ``sys.modules`` without running its
``__init__``, so importing a submodule loads that submodule and what it
imports.  The package stays complete for any caller: the names in ``LEAN``
resolve to their submodules on first use, a submodule asked for as an
attribute (``from pyroute2 import config``) is imported, and any other name
the package exports runs the real ``__init__`` once (PEP 562's module
``__getattr__``), so ``from pyroute2 import NDB`` still works, at the old cost.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

# Per package: the names it exports that the daemon uses, and the submodule
# that defines each.
LEAN = {
    "pyroute2": {
        "IPRoute": "pyroute2.iproute",
        "AsyncIPRoute": "pyroute2.iproute",
        "NetlinkError": "pyroute2.netlink.exceptions",
    },
    "prometheus_client": {
        "CollectorRegistry": "prometheus_client.registry",
        "Counter": "prometheus_client.metrics",
        "Gauge": "prometheus_client.metrics",
    },
}


def install() -> None:
    """Make each package in LEAN importable without its ``__init__``; a no-op for
    one already imported (by us or anyone) or not installed."""
    for package, names in LEAN.items():
        _install(package, names)


def _install(name: str, lean: dict[str, str]) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader
    state = {"complete": False}

    def __getattr__(attr: str) -> Any:  # the module hook of PEP 562
        if attr in lean:
            return getattr(importlib.import_module(lean[attr]), attr)
        if importlib.util.find_spec(f"{name}.{attr}") is not None:  # a submodule
            return importlib.import_module(f"{name}.{attr}")
        if not state["complete"] and not attr.startswith("__"):
            state["complete"] = True
            loader.exec_module(package)  # the package's own __init__, into this module
            if attr in package.__dict__:
                return package.__dict__[attr]
        raise AttributeError(f"module {name!r} has no attribute {attr!r}")

    package.__dict__["__getattr__"] = __getattr__
    sys.modules[name] = package
