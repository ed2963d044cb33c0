"""The daemon's HTTP endpoint: ``/metrics`` (Prometheus), ``/healthz``, ``/readyz``.

A minimal HTTP/1.0 responder on the event loop: ``/healthz`` answering at all
shows the loop is alive; ``/readyz`` is 200 once the daemon is ready (sockets
served; in Kubernetes mode also registered with kubelet), else 503 with why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from cni_server.metrics import Metrics

log = logging.getLogger(__name__)
_STATUS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HealthServer:
    def __init__(self, address: str, metrics: Metrics,
                 ready: Callable[[], tuple[bool, str]]) -> None:
        host, _, port = address.rpartition(":")
        self.host = host.strip("[]") or "0.0.0.0"
        self.port = int(port)
        self.metrics = metrics
        self.ready = ready
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        """The bound host:port (the real port when 0 was asked for)."""
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, self.host, self.port)
        log.info("event=http_listening address=%s", self.address)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass  # headers: nothing we need
            method, _, rest = line.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            code, body, ctype = self._route(method, path)
            writer.write(f"HTTP/1.0 {code} {_STATUS[code]}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                         .encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

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
