"""Performs the privileged steps of requests the protocol session authorized.

The session (``protocol.py``) decides *whether*; the broker does the *how*, and
keeps the checks that need the kernel: a received fd really is an AF_XDP
socket, and the socket to bind is the very one handed out for that queue.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from cni_server import xsk
from cni_server.allocation import Allocation
from cni_server.fds import OwnedFd
from cni_server.protocol import Grant, Op

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """Result of a grant: whether it worked, and the fd to send with the reply.

    ``fd`` is borrowed (e.g. the XSKMAP fd the program owns); ``created`` is a
    new fd made for this reply, which the caller closes once it is sent.
    """

    ok: bool
    fd: int | None = None
    created: OwnedFd | None = None
    reason: str = ""
    extra: OwnedFd | None = None  # a second new fd sent after ``fd`` (the UMEM memfd)


class Broker:
    """The daemon's hands: XSKMAP handout, AF_XDP socket creation, bind, busy-poll."""

    def perform(self, allocation: Allocation, grant: Grant, received: list[OwnedFd]) -> Outcome:
        try:
            if grant.op is Op.MAP_FD:
                return self._map_fd(allocation, grant)
            if grant.op is Op.XSK_SOCKET:
                return self._xsk_socket(allocation, grant)
            if grant.op is Op.XSK_BOUND:
                return self._xsk_bound(allocation, grant)
            if grant.op is Op.XSK_BIND:
                return self._xsk_bind(allocation, grant, received[0])
            return self._busy_poll(allocation, grant, received[0])
        except (OSError, ValueError) as e:
            log.warning("event=grant_failed op=%s netdev=%s queue=%d error=%r",
                        grant.op.value, grant.netdev, grant.queue, str(e))
            if isinstance(e, xsk.XskError) and "rings of an AF_XDP socket bound" in str(e):
                return Outcome(False, reason="kernel cannot map rings after bind")
            if grant.op is Op.XSK_BOUND and isinstance(e, OSError) and e.errno == errno.EBUSY:
                # Another socket holds the queue, or one just closed: the kernel
                # frees a queue some milliseconds after its socket is released.
                return Outcome(False, reason="queue busy")
            return Outcome(False, reason=f"{grant.op.value} failed")

    @staticmethod
    def _map_fd(allocation: Allocation, grant: Grant) -> Outcome:
        device = allocation.netdevs[allocation.resolve(grant.netdev)]
        if device.program.program.closed:
            return Outcome(False, reason="netdev released")
        return Outcome(True, fd=device.program.map_fd)

    @staticmethod
    def _xsk_socket(allocation: Allocation, grant: Grant) -> Outcome:
        device = allocation.netdevs[allocation.resolve(grant.netdev)]
        sock = device.netns.run(xsk.create_socket)
        try:
            allocation.record_xsk(allocation.resolve(grant.netdev), grant.queue,
                                  xsk.inode(sock.fileno()))
        except BaseException:
            sock.close()
            raise
        return Outcome(True, created=sock, fd=sock.fileno())

    @staticmethod
    def _xsk_bound(allocation: Allocation, grant: Grant) -> Outcome:
        """A socket the client can use but not re-bind: made, bound and put in the
        XSKMAP here; sent with its UMEM memfd."""
        name = allocation.resolve(grant.netdev)
        device = allocation.netdevs[name]
        sock = device.netns.run(xsk.create_socket)
        try:
            umem = xsk.make_bound(sock.fileno(), device.program.ifindex, grant.queue,
                                  grant.frames, grant.frame_size)
        except BaseException:
            sock.close()
            raise
        try:
            xsk.insert(device.program.map_fd, grant.queue, sock.fileno())
            allocation.record_xsk(name, grant.queue, xsk.inode(sock.fileno()))
        except BaseException:
            sock.close()
            umem.close()
            raise
        return Outcome(True, created=sock, fd=sock.fileno(), extra=umem)

    @staticmethod
    def _xsk_bind(allocation: Allocation, grant: Grant, sock: OwnedFd) -> Outcome:
        fd = sock.fileno()
        if not xsk.is_xdp_socket(fd):
            return Outcome(False, reason="fd is not an AF_XDP socket")
        expected = allocation.handed_out_xsk(allocation.resolve(grant.netdev), grant.queue)
        if expected is None or xsk.inode(fd) != expected:
            return Outcome(False, reason="not the socket handed out for this queue")
        device = allocation.netdevs[allocation.resolve(grant.netdev)]
        xsk.bind(fd, device.program.ifindex, grant.queue)
        xsk.insert(device.program.map_fd, grant.queue, fd)
        return Outcome(True)

    @staticmethod
    def _busy_poll(allocation: Allocation, grant: Grant, sock: OwnedFd) -> Outcome:
        """Busy-poll settings (which need privileges the pod lacks) only on a socket of
        the caller's own allocation: one this daemon handed out for it, or one made in
        the network namespace of one of its netdevs (DPDK's own socket, in map mode:
        in a pod's namespace only the pod's netdevs are there to bind to)."""
        fd = sock.fileno()
        if not xsk.is_xdp_socket(fd):
            return Outcome(False, reason="fd is not an AF_XDP socket")
        if not allocation.handed_out(xsk.inode(fd)):
            home = xsk.socket_netns_inode(fd)
            if home not in {dev.netns.inode for dev in allocation.netdevs.values()}:
                return Outcome(False, reason="not a socket of this allocation")
        xsk.set_busy_poll(fd, grant.timeout_us, grant.budget)
        return Outcome(True)
