"""Invoke a CNI plugin the way a container runtime does (there is no cnitool package here).

env + stdin config + CNI_PATH; ADD results are cached per (container, ifname)
and fed to CHECK/DEL as ``prevResult``, as libcni does.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CNI_PATH = "/usr/lib/cni"  # Debian's containernetworking-plugins


@dataclass
class Outcome:
    code: int
    out: dict[str, Any]
    stderr: str


@dataclass
class Runner:
    plugin: list[str]  # argv of the plugin executable
    cache: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def __call__(self, command: str, conf: dict[str, Any], *, container: str = "c1",
                 netns: str = "", ifname: str = "net1", env: dict[str, str] | None = None,
                 raw: bytes | None = None, omit: tuple[str, ...] = (),
                 pod: tuple[str, str] = ("default", "pod-a")) -> Outcome:
        # CNI_ARGS as containerd and CRI-O set them for a Kubernetes pod.
        args = (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod[0]};K8S_POD_NAME={pod[1]};"
                f"K8S_POD_INFRA_CONTAINER_ID={container}")
        environ = {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_NETNS": netns,
                   "CNI_IFNAME": ifname, "CNI_PATH": CNI_PATH, "PATH": "/usr/sbin:/usr/bin",
                   "CNI_ARGS": args}
        environ.update(env or {})
        for key in omit:
            environ.pop(key, None)
        if not netns:
            environ.pop("CNI_NETNS")
        conf = dict(conf)
        prev = self.cache.get((container, ifname))
        if command in ("CHECK", "DEL") and prev is not None:
            conf["prevResult"] = prev
        proc = subprocess.run(self.plugin, input=raw if raw is not None else json.dumps(conf).encode(),
                              capture_output=True, env=environ, timeout=60)
        text = proc.stdout.decode()
        out = json.loads(text) if text.strip() else {}
        if command == "ADD" and proc.returncode == 0:
            self.cache[(container, ifname)] = out
        if command == "DEL" and proc.returncode == 0:
            self.cache.pop((container, ifname), None)
        return Outcome(proc.returncode, out, proc.stderr.decode())


def host_python_plugin(path: Path) -> list[str]:
    """The plugin as the runtime runs it: the host's python3, isolated from any venv."""
    return ["/usr/bin/python3", "-I", "-S", str(path)]
