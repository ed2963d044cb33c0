"""rtnetlink events for the node view, received in a thread of their own.

pyroute2's synchronous API cannot run inside an event loop, so a thread receives
the events (read as ``cni_server.rtread`` reads them) and hands each to the loop.

When events come faster than the thread reads them, the kernel drops what does
not fit in the socket's buffer and says so (ENOBUFS).  pyroute2's socket then
fails every later read, so the watch opens a new one, and only then calls
``on_lost`` on the loop: the view no longer matches the node, and the caller
dumps it afresh (events after the new subscription are not missed).  The buffer
is asked for at ``RCVBUF`` bytes past ``net.core.rmem_max`` (the daemon has
CAP_NET_ADMIN), so that a burst of a few thousand events (a node's pods starting
at once) fits.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from pyroute2 import IPRoute

from cni_server.rtread import read_events_lean

log = logging.getLogger(__name__)

# rtnetlink multicast groups: links, IPv4/IPv6 addresses and routes.
GROUPS = 0x1 | 0x10 | 0x40 | 0x100 | 0x400
RCVBUF = 8 * 1024 * 1024
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


class LinkWatch:
    def __init__(self, loop: asyncio.AbstractEventLoop, on_message: Callable[[Any], None],
                 on_lost: Callable[[], None]) -> None:
        """``on_message`` (each event) and ``on_lost`` (events were dropped) are called
        on ``loop``'s thread."""
        self.loop = loop
        self.on_message = on_message
        self.on_lost = on_lost
        self._ipr: IPRoute | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    async def start(self, timeout: float = 10.0) -> bool:
        """Subscribe and start receiving; False (logged) if the socket could not be
        set up: the caller's periodic rescans are all it has then.  (The socket is
        made and read in the watch's own thread: pyroute2's synchronous API keeps
        per-thread state.)"""
        ready = threading.Event()

        def run() -> None:
            try:
                self._ipr = self._subscribe()
            except Exception:
                log.exception("event=netlink_watch_failed")
                return
            finally:
                ready.set()
            self._receive()

        self._thread = threading.Thread(target=run, name="netlink-events", daemon=True)
        self._thread.start()
        await asyncio.to_thread(ready.wait, timeout)
        return self._ipr is not None

    @staticmethod
    def _subscribe() -> IPRoute:
        ipr = IPRoute()
        try:
            read_events_lean(ipr)
            with contextlib.suppress(OSError):  # without CAP_NET_ADMIN: rmem_max
                ipr.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            ipr.bind(groups=GROUPS)
        except BaseException:
            ipr.close()
            raise
        return ipr

    def _receive(self) -> None:
        while (ipr := self._ipr) is not None:
            try:
                messages = ipr.get()
            except OSError as e:
                if e.errno != errno.ENOBUFS or self._stopping:
                    return  # closed by stop()
                fresh: IPRoute | None = None
                try:
                    fresh = self._subscribe()
                except Exception:
                    log.exception("event=netlink_watch_failed")
                with contextlib.suppress(Exception):
                    ipr.close()
                if self._stopped():  # stop() came meanwhile
                    if fresh is not None:
                        fresh.close()
                    return
                self._ipr = fresh
                self.loop.call_soon_threadsafe(self.on_lost)
                continue
            except Exception:
                return  # closed by stop()
            for msg in messages:
                self.loop.call_soon_threadsafe(self.on_message, msg)

    def _stopped(self) -> bool:
        """Read anew: stop() sets it from the loop's thread while this one works."""
        return self._stopping

    def stop(self) -> None:
        self._stopping = True
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
