"""The daemon's HTTP endpoint: ``/metrics`` (Prometheus), ``/healthz``, ``/readyz``.

A minimal HTTP/1.0 responder on the event loop: ``/healthz`` answering at all
shows the loop is alive; ``/readyz`` is 200 once the daemon is ready (sockets
served; in Kubernetes mode also registered with kubelet), else 503 with why.

It may face the network (the DaemonSet binds it to the node's address for the
probes and Prometheus), so it is built to shed what a hostile peer sends:

- at most ``max_connections`` at once, and at most ``max_per_peer`` from one
  address: a connection over either is closed at once, so nobody can hold the
  daemon's fds, and the kubelet's probes (from the node's own address) still
  get a slot while others flood;
- one deadline for the whole request (request line and headers), not a timeout
  per line that a peer renews by trickling;
- a bounded request: a line over ``MAX_LINE`` bytes or headers over
  ``MAX_HEADER_BYTES`` get ``431 Request Header Fields Too Large``.

Why not a library server: prometheus-client's own server runs a thread per
connection with none of these limits, and an HTTP framework would add a large
dependency for three fixed paths.  asyncio's ``start_server`` already backs off
when accept() fails for lack of fds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from cni_server.metrics import Metrics

log = logging.getLogger(__name__)
_STATUS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
           431: "Request Header Fields Too Large", 503: "Service Unavailable"}
MAX_LINE = 4096
MAX_HEADER_BYTES = 16384


class _TooLarge(Exception):
    pass


class HealthServer:
    def __init__(self, address: str, metrics: Metrics,
                 ready: Callable[[], tuple[bool, str]], *, max_connections: int = 64,
                 max_per_peer: int = 8, deadline: float = 5.0) -> None:
        host, _, port = address.rpartition(":")
        self.host = host.strip("[]") or "127.0.0.1"
        self.port = int(port)
        self.metrics = metrics
        self.ready = ready
        self.max_connections = max_connections
        self.max_per_peer = max_per_peer
        self.deadline = deadline
        self.open = 0
        self.refused = 0
        self._per_peer: dict[str, int] = {}
        self._server: asyncio.Server | None = None
        self._last_refusal_log = 0.0

    @property
    def address(self) -> str:
        """The bound host:port (the real port when 0 was asked for)."""
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, self.host, self.port,
                                                  limit=MAX_LINE)
        log.info("event=http_listening address=%s", self.address)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if self.open >= self.max_connections or self._per_peer.get(host, 0) >= self.max_per_peer:
            self._refuse(host)
            writer.transport.abort()  # no lingering close: the slot is free at once
            return
        self.open += 1
        self._per_peer[host] = self._per_peer.get(host, 0) + 1
        try:
            try:
                method, path = await asyncio.wait_for(self._read_request(reader), self.deadline)
                code, body, ctype = self._route(method, path)
            except _TooLarge:
                code, body, ctype = 431, b"request headers too large\n", "text/plain"
            writer.write(f"HTTP/1.0 {code} {_STATUS[code]}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                         .encode() + body)
            await asyncio.wait_for(writer.drain(), self.deadline)
        except (TimeoutError, ConnectionError, UnicodeError):
            pass
        finally:
            self.open -= 1
            left = self._per_peer[host] - 1
            if left:
                self._per_peer[host] = left
            else:
                del self._per_peer[host]
            writer.transport.abort()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
        total = 0

        async def line() -> bytes:
            nonlocal total
            try:
                data = await reader.readline()
            except (ValueError, asyncio.LimitOverrunError):  # longer than MAX_LINE
                raise _TooLarge from None
            total += len(data)
            if total > MAX_HEADER_BYTES:
                raise _TooLarge
            return data

        first = await line()
        while (await line()) not in (b"\r\n", b"\n", b""):
            pass  # headers: nothing we need
        method, _, rest = first.decode("latin-1").partition(" ")
        return method, rest.split(" ", 1)[0].split("?", 1)[0]

    def _refuse(self, host: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= 1.0:  # a flood writes one line a second
            self._last_refusal_log = now
            log.warning("event=http_connection_refused peer=%s open=%d refused_so_far=%d",
                        host, self.open, self.refused)

    def _route(self, method: str, path: str) -> tuple[int, bytes, str]:
        if method not in ("GET", "HEAD"):
            return 405, b"GET only\n", "text/plain"
        if path == "/metrics":
            return 200, self.metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8"
        if path == "/healthz":
            return 200, b"ok\n", "text/plain"
        if path == "/readyz":
            ok, why = self.ready()
            return (200, b"ready\n", "text/plain") if ok else (503, f"{why}\n".encode(),
                                                                  "text/plain")
        return 404, b"not found\n", "text/plain"

