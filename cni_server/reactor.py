"""The handout server's event loop within the event loop: one epoll set of ours.

The asyncio loop watches the set as a single fd.  A readable connection then
costs a dict lookup and a direct call, instead of asyncio's per-fd selector keys
and handles; one loop wakeup serves every ready connection and listening socket,
round robin between clients (see ``Reactor._on_events``).  All methods must be
called on the loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import time
from collections.abc import Callable

# How long, and for how many rounds, one loop wakeup may keep serving handshakes.
# The round cap bounds the loop's wait by work, not only by time, so a slowed-down
# machine cannot stretch it.
WAKEUP_BUDGET = 0.005
WAKEUP_ROUNDS = 32
PER_CLIENT_PER_ROUND = 4


class Reactor:
    """fd -> handler, served fairly between clients (a client: a key, e.g. a pid)."""

    def __init__(self, spin: float, busy: Callable[[], bool]) -> None:
        """``spin``: seconds to keep polling for the next request after the last one,
        while ``busy()`` (connections are open); 0 never spins."""
        self.spin = spin
        self.busy = busy
        self.longest_wakeup = 0  # most rounds served in one loop wakeup
        self._loop: asyncio.AbstractEventLoop | None = None
        self._epoll: select.epoll | None = None
        self._handlers: dict[int, tuple[int, Callable[[], None]]] = {}  # fd -> (key, handler)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._epoll is None:
            self._loop = loop
            self._epoll = select.epoll()
            loop.add_reader(self._epoll.fileno(), self._on_events)

    def close(self) -> None:
        if self._epoll is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None

    def watch(self, fd: int, handler: Callable[[], None], key: int) -> None:
        assert self._epoll is not None
        self._handlers[fd] = (key, handler)
        self._epoll.register(fd, select.EPOLLIN)

    def unwatch(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None and self._epoll is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    def forget(self, fd: int) -> None:
        """``fd`` is about to be closed: closing the only reference to a socket also
        removes it from the epoll set, so only our handler needs to go."""
        self._handlers.pop(fd, None)

    def _on_events(self) -> None:
        """Serve what is ready in our epoll set, and stay while handshakes go on.

        A handshake is four round trips in quick succession (DPDK: one
        connection per queue, back to back), and the client's next request
        comes a few tens of microseconds after our reply.  Going back to the
        event loop in between costs a loop round per request (more Python
        than answering it), and blocking in epoll_wait() until the request
        comes costs a sleep and a wakeup of this CPU (as much again in a VM).
        So while connections are open we keep polling our epoll set, busy,
        for up to ``spin`` (the server's default 50 us) after the last
        request, the way the kernel's socket busy polling waits for the next
        packet.  Measured with benchmarks/handshake.py: +15-20% sequential
        handshakes/s; the blocking wait was no faster than going back to the
        loop.

        The event loop gets its turn when nothing comes within the spin, when
        no connection is open, and at the latest after ``WAKEUP_ROUNDS``
        rounds or ``WAKEUP_BUDGET``, whichever comes first, so timers, the
        control socket and gRPC wait at most that long under a steady stream
        of handshakes.  The spin costs CPU only while a client
        holds a connection open and is slow to send its next request.

        Fair between clients, not connections: when several clients have
        requests ready, each is served at most ``PER_CLIENT_PER_ROUND`` per
        round (a client is a peer process; a listener counts as one).  The
        rest stay ready (epoll is level-triggered and reports them again,
        behind the others), so a process hammering with 200 connections gets
        the share of one client, and a well-behaved client waits for a round
        of a few dozen requests, not of everything the flood has queued.
        """
        assert self._epoll is not None
        epoll, handlers, spin = self._epoll, self._handlers, self.spin
        deadline = time.monotonic() + WAKEUP_BUDGET
        rounds = 0
        try:
            while rounds < WAKEUP_ROUNDS:
                events = epoll.poll(0, 256)
                if not events:
                    if not spin or not self.busy():
                        return
                    spin_until = time.monotonic() + spin
                    while not events and time.monotonic() < spin_until:
                        events = epoll.poll(0, 256)
                    if not events:
                        return
                rounds += 1
                if len(events) <= PER_CLIENT_PER_ROUND:
                    for fd, _mask in events:
                        entry = handlers.get(fd)
                        if entry is not None:
                            entry[1]()
                else:
                    self._serve_fairly(events)
                if time.monotonic() >= deadline:
                    return
        finally:
            if rounds > self.longest_wakeup:
                self.longest_wakeup = rounds

    def _serve_fairly(self, events: list[tuple[int, int]]) -> None:
        """One round over many ready fds: at most ``PER_CLIENT_PER_ROUND`` per client."""
        entries = [e for e in map(self._handlers.get, [fd for fd, _ in events]) if e is not None]
        if len({key for key, _ in entries}) == 1:
            for _key, handler in entries:
                handler()
            return
        served: dict[int, int] = {}
        for key, handler in entries:
            n = served.get(key, 0)
            if n < PER_CLIENT_PER_ROUND:
                served[key] = n + 1
                handler()
