"""Allocations: which client may have which netdevs, on which socket.

An allocation is what one handout socket serves.  In standalone mode there is
one per configured netdev; in Kubernetes (issue 3) one per container
allocation.  It implements :class:`cni_server.protocol.Allocation`, the view the
protocol session decides against.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bpf.program import NetdevProgram
from cni_server import protocol
from cni_server.netns import Netns


@dataclass
class AllocatedDevice:
    """One netdev of an allocation: its program (and XSKMAP) and where it lives now."""

    name: str
    program: NetdevProgram
    netns: Netns  # the namespace holding the netdev (not owned here)

    def view(self) -> protocol.Device:
        return protocol.Device(self.name, self.netns.inode, self.program.queue_slots)


@dataclass
class Allocation:
    """A set of netdevs handed out on one socket to the holders of given hostnames."""

    id: str
    netdevs: dict[str, AllocatedDevice]
    hostnames_allowed: frozenset[str]
    socket_path: Path
    check_peer_netns: bool = True
    # (netdev, queue) -> inode of the AF_XDP socket last handed out for it by
    # /xsk_socket: /xsk_bind only binds that very socket.
    _xsk_handouts: dict[tuple[str, int], int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def host_allowed(self, hostname: str) -> bool:
        return hostname in self.hostnames_allowed

    def hostnames(self) -> Iterable[str]:
        return self.hostnames_allowed

    def device(self, name: str) -> protocol.Device | None:
        dev = self.netdevs.get(name)
        return dev.view() if dev else None

    def devices(self) -> list[protocol.Device]:
        return [d.view() for d in self.netdevs.values()]

    def record_xsk(self, netdev: str, queue: int, inode: int) -> None:
        with self._lock:
            self._xsk_handouts[(netdev, queue)] = inode

    def handed_out_xsk(self, netdev: str, queue: int) -> int | None:
        with self._lock:
            return self._xsk_handouts.get((netdev, queue))

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "socket": str(self.socket_path),
            "hostnames": sorted(self.hostnames_allowed),
            "check_peer_netns": self.check_peer_netns,
            "devices": {n: {"netns": d.netns.inode, **d.program.describe()}
                        for n, d in self.netdevs.items()},
        }

