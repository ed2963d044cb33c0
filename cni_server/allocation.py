"""Allocations: which client may have which netdevs, on which sockets.

An allocation is what a set of handout sockets serves.  In standalone mode
there is one per configured netdev (one socket); in Kubernetes one per
container allocation, with one socket per device directory.  It implements
:class:`cni_server.protocol.Allocation`, the view the protocol session decides
against.
"""

from __future__ import annotations

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
    queues: int = 0  # queue slots clients may use; 0: all the XSKMAP has
    pin: Path | None = None
    # Set while its map must not be handed out: the netdev is gone, or lost our
    # program (a map no program reads from would take a client's socket and
    # deliver nothing).
    unavailable: str = ""
    # A netdev of a pool that CNI moves into its pod, not there yet: until CNI ADD
    # nothing of it is handed out, so a host process that knows the pod's name
    # cannot take the map before the pod exists.
    awaiting_cni: bool = False

    @property
    def queue_count(self) -> int:
        slots = self.program.queue_slots
        return min(self.queues, slots) if self.queues else slots

    def view(self) -> protocol.Device:
        why = self.unavailable or ("not in its pod yet (waiting for CNI ADD)"
                                   if self.awaiting_cni else "")
        return protocol.Device(self.name, self.netns.inode, self.queue_count, why)


@dataclass
class Allocation:
    """A set of netdevs handed out on some sockets to the holders of given hostnames."""

    id: str
    netdevs: dict[str, AllocatedDevice]
    hostnames_allowed: frozenset[str]
    socket_paths: tuple[Path, ...] = ()
    check_peer_netns: bool = True
    pool: str = ""
    owner: str = ""  # "namespace/pod/container" once known (Kubernetes)
    idle_timeout: float = 0.0  # seconds; 0: the server's default
    # pod-visible name -> netdev, for netdevs CNI ADD renamed (DPDK asks by that name)
    aliases: dict[str, str] = field(default_factory=dict)
    # /xsk_socket may hand out unbound sockets (opt-in: see docs/security.md)
    allow_unbound_xsk: bool = False
    umem_limit: int = protocol.DEFAULT_UMEM_LIMIT  # bytes per /xsk_bound_socket
    # (netdev, queue) -> inode of the AF_XDP socket last handed out for it by
    # /xsk_socket: /xsk_bind only binds that very socket.
    # (Read and written on the event loop only, by the broker: no lock.)
    _xsk_handouts: dict[tuple[str, int], int] = field(default_factory=dict)

    def host_allowed(self, hostname: str) -> bool:
        return hostname in self.hostnames_allowed

    def hostnames(self) -> Iterable[str]:
        return self.hostnames_allowed

    def resolve(self, name: str) -> str:
        """The netdev a client means by ``name`` (its own name, or the one it has in the pod)."""
        return self.aliases.get(name, name)

    def device(self, name: str) -> protocol.Device | None:
        dev = self.netdevs.get(self.resolve(name))
        return dev.view() if dev else None

    def devices(self) -> list[protocol.Device]:
        return [d.view() for d in self.netdevs.values()]

    def record_xsk(self, netdev: str, queue: int, inode: int) -> None:
        self._xsk_handouts[(netdev, queue)] = inode

    def handed_out_xsk(self, netdev: str, queue: int) -> int | None:
        return self._xsk_handouts.get((netdev, queue))

    def handed_out(self, inode: int) -> bool:
        """Whether the socket with ``inode`` is one this allocation handed out."""
        return inode in self._xsk_handouts.values()

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "pool": self.pool,
            "owner": self.owner,
            "sockets": [str(p) for p in self.socket_paths],
            "hostnames": sorted(self.hostnames_allowed),
            "check_peer_netns": self.check_peer_netns,
            "devices": {n: {"netns": d.netns.inode, "queues": d.queue_count,
                            "pin": str(d.pin) if d.pin else None,
                            "unavailable": d.unavailable or None, **d.program.describe()}
                        for n, d in self.netdevs.items()},
        }
