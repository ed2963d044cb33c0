"""Invoke CNI plugins the way a container runtime does, by libcni's rules (there is no
cnitool package here, and libcni is Go).

What libcni (containerd, CRI-O, Multus) does, and this runner does too:

- a plugin is the executable named by the config's ``type``, found in the ``CNI_PATH``
  directories in order;
- each plugin config of a list gets the list's ``name`` and ``cniVersion``;
  ``runtimeConfig`` carries only the capability arguments the plugin declares in its
  ``capabilities`` (Multus' ``deviceID``, for one);
- ADD runs the plugins in order, each one's result is the next one's ``prevResult``,
  and the last result is cached per (network name, container id, ifname);
- CHECK (0.4.0 on) runs them in order and DEL in reverse, each given the cached result
  as ``prevResult``; DEL forgets it;
- GC (1.1.0) gives each plugin the network's ``cni.dev/valid-attachments``, built
  from the cache of that network;
- the plugin's environment is the runtime's own plus ``CNI_COMMAND``,
  ``CNI_CONTAINERID``, ``CNI_NETNS``, ``CNI_IFNAME``, ``CNI_ARGS``, ``CNI_PATH``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CNI_PATH = "/usr/lib/cni"  # Debian's containernetworking-plugins


@dataclass
class Outcome:
    code: int
    out: dict[str, Any]
    stderr: str


def install_plugin(dest: Path) -> Path:
    """Our CNI executable installed into ``dest`` as the DaemonSet's init container
    installs it (``afxdp install-cni``); returns the directory."""
    subprocess.run([sys.executable, "-m", "cni_server.cli", "install-cni", "--dest", str(dest)],
                   check=True, capture_output=True)
    return dest


def with_capabilities(conf: dict[str, Any], runtime: dict[str, Any]) -> dict[str, Any]:
    """``conf`` with ``runtimeConfig`` holding only the capability args it declares."""
    declared = {k for k, v in (conf.get("capabilities") or {}).items() if v is True}
    rc = {k: v for k, v in runtime.items() if k in declared}
    conf = {k: v for k, v in conf.items() if k != "runtimeConfig"}
    if rc:
        conf["runtimeConfig"] = rc
    return conf


def _since(version: str, first: str) -> bool:
    try:
        return tuple(map(int, version.split("."))) >= tuple(map(int, first.split(".")))
    except ValueError:
        return False


@dataclass
class Runner:
    path: list[Path]  # CNI_PATH, searched in order
    # the runtime's own environment, which plugins inherit
    environ: dict[str, str] = field(default_factory=lambda: {"PATH": "/usr/sbin:/usr/bin"})
    cache: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)

    def find(self, plugin_type: str) -> Path:
        for d in self.path:
            candidate = Path(d) / plugin_type
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        raise FileNotFoundError(f'failed to find plugin "{plugin_type}" in path '
                                f"{[str(d) for d in self.path]}")

    def _env(self, command: str, container: str, netns: str, ifname: str,
             pod: tuple[str, str]) -> dict[str, str]:
        # CNI_ARGS as containerd and CRI-O set them for a Kubernetes pod.
        args = (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod[0]};K8S_POD_NAME={pod[1]};"
                f"K8S_POD_INFRA_CONTAINER_ID={container}")
        env = {**self.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": container,
               "CNI_IFNAME": ifname, "CNI_PATH": ":".join(str(d) for d in self.path),
               "CNI_ARGS": args}
        if netns:
            env["CNI_NETNS"] = netns
        return env

    def exec(self, plugin_type: str, stdin: bytes, env: dict[str, str]) -> Outcome:
        proc = subprocess.run([str(self.find(plugin_type))], input=stdin, capture_output=True,
                              env=env, timeout=60)
        text = proc.stdout.decode()
        return Outcome(proc.returncode, json.loads(text) if text.strip() else {},
                       proc.stderr.decode())

    def __call__(self, command: str, conf: dict[str, Any], *, container: str = "c1",
                 netns: str = "", ifname: str = "net1", env: dict[str, str] | None = None,
                 raw: bytes | None = None, omit: tuple[str, ...] = (),
                 pod: tuple[str, str] = ("default", "pod-a"),
                 runtime: dict[str, Any] | None = None) -> Outcome:
        """Run ``command`` for a network: a config list (``plugins``) or a single plugin
        config (libcni's AddNetwork: a list of one).  ``runtime``: the runtime's
        capability args.  ``env``/``omit``/``raw`` bend the rules, to test the plugin's
        own checks: extra or missing variables, bytes that are not a config."""
        plugins = conf.get("plugins", [conf])
        name, version = str(conf.get("name", "")), str(conf.get("cniVersion", ""))
        environ = self._env(command, container, netns, ifname, pod)
        environ.update(env or {})
        for var in omit:
            environ.pop(var, None)
        key = (name, container, ifname)
        cached = self.cache.get(key)
        if command == "GC":
            valid = [{"containerID": c, "ifname": i} for (n, c, i) in self.cache if n == name]
            conf = {"cni.dev/valid-attachments": valid, **conf}
        order = list(reversed(plugins)) if command == "DEL" else plugins
        result: dict[str, Any] | None = None
        outcome = Outcome(0, {}, "")
        for plugin in order:
            one = dict(plugin)
            if "plugins" in conf:
                one.update(name=name, cniVersion=version)
            one = with_capabilities(one, runtime or {})
            if command == "ADD" and result is not None:
                one["prevResult"] = result
            elif command in ("CHECK", "DEL") and cached is not None and _since(version, "0.4.0"):
                one["prevResult"] = cached
            elif command == "GC":
                one["cni.dev/valid-attachments"] = conf["cni.dev/valid-attachments"]
            stdin = raw if raw is not None else json.dumps(one).encode()
            # (a config without a type, as some tests of ours send, goes to ours)
            outcome = self.exec(str(plugin.get("type") or "afxdp"), stdin, environ)
            if outcome.code != 0:
                return outcome
            if command == "ADD":
                result = outcome.out
        if command == "ADD" and result is not None:
            self.cache[key] = result
        if command == "DEL":
            self.cache.pop(key, None)
        return outcome
