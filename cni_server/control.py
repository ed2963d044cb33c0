"""The daemon's local control socket: newline-delimited JSON requests, root only.

``{"op": "status"}`` -> ``{"ok": true, "status": {...}}``.  Later front ends
(the CNI shim) add operations through :meth:`ControlServer.register`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_REQUEST = 64 * 1024


class ControlError(Exception):
    """The control socket cannot be reached or answered an error."""


class ControlServer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._handlers: dict[str, Handler] = {}
        self._server: asyncio.AbstractServer | None = None

    def register(self, op: str, handler: Handler) -> None:
        self._handlers[op] = handler

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
            except ConnectionRefusedError:
                self.path.unlink()
            else:
                raise ControlError(f"another daemon answers on {self.path}")
            finally:
                probe.close()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=str(self.path),
                                                           limit=MAX_REQUEST)
        finally:
            os.umask(old)
        log.info("event=control_listening socket=%s", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), timeout=30)
                except (TimeoutError, ValueError, ConnectionError):
                    return
                if not line:
                    return
                reply = await self._dispatch(line)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return {"ok": False, "error": "request needs an 'op' string"}
        handler = self._handlers.get(request["op"])
        if handler is None:
            return {"ok": False, "error": f"unknown op {request['op']!r}"}
        try:
            return {"ok": True, **await handler(request)}
        except Exception as e:
            log.exception("event=control_error op=%s", request["op"])
            return {"ok": False, "error": str(e)}


def call(path: Path, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Client side: one request, one reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError as e:
            raise ControlError(f"daemon not reachable on {path}: {e.strerror}") from e
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    try:
        reply: dict[str, Any] = json.loads(buf)
    except ValueError as e:
        raise ControlError(f"daemon on {path} sent an unreadable reply") from e
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "unknown error")))
    return reply
