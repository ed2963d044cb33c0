"""The daemon's endpoint for the CNI plugin: the socket its requests arrive on.

A root-only ``SOCK_SEQPACKET`` socket.  One request per connection: a JSON
datagram (at most 64 KiB) with, for ADD, the pod's network namespace as an fd
(SCM_RIGHTS, so the daemon needs no view of the runtime's paths); one JSON
reply ``{"ok": true, "result": {...}}`` or ``{"ok": false, "code": N, "msg":
..., "details": ...}`` with CNI error codes (``docs/cni.md``).  An ADD that says
``"ipam": "follows"`` is followed by a second datagram, ``{"ipam": {...}}`` or
``{"ipam_failed": msg}``: the plugin runs IPAM while the daemon moves the device.
What each operation does is ``plugin.cniops``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from functools import partial
from pathlib import Path
from typing import Any

from cni_server.fds import OwnedFd, close_all, fds_from_ancillary
from cni_server.lifecycle import cancel_tasks
from cni_server.netns import NetnsError
from cni_server.registry import Registry
from plugin.cniops import (
    BAD_REQUEST,
    NETNS_UNUSABLE,
    TRY_AGAIN,
    CniError,
    CniOperations,
    FollowUp,
    OwnerCheck,
)

log = logging.getLogger(__name__)
MAX_REQUEST = 64 * 1024
_ANC = socket.CMSG_SPACE(4 * 4)


class CniEndpoint:
    def __init__(self, path: Path, registry: Registry, check_owner: OwnerCheck | None = None
                 ) -> None:
        self.path = path
        self.registry = registry
        self.operations = CniOperations(registry, check_owner)
        self._ops = self.operations.handlers()
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the socket ----------------------------------------------------------------

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(64)
        sock.setblocking(False)
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)
        log.info("event=cni_endpoint_listening socket=%s", self.path)

    async def close(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        await cancel_tasks(*self._tasks)

    def _accept(self) -> None:
        assert self._sock is not None
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        task = asyncio.get_running_loop().create_task(self._serve(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        fds: list[OwnedFd] = []
        with conn:
            conn.settimeout(10)
            try:
                data, anc, flags, _ = await asyncio.to_thread(conn.recvmsg, MAX_REQUEST + 1, _ANC)
                fds = fds_from_ancillary(anc)
                reply = await self._dispatch(data, flags, fds, partial(_follow_up, conn))
            except OSError as e:
                log.warning("event=cni_request_failed error=%r", str(e))
                return
            finally:
                close_all(fds)
            with contextlib.suppress(OSError):
                conn.send(json.dumps(reply).encode())

    async def _dispatch(self, data: bytes, flags: int, fds: list[OwnedFd],
                        follow_up: FollowUp | None = None) -> dict[str, Any]:
        op_label = "?"  # for metrics; the op once the request is understood
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise CniError(BAD_REQUEST, "request too large")
            try:
                request = json.loads(data)
            except ValueError:
                raise CniError(BAD_REQUEST, "request is not JSON") from None
            op = request.get("op") if isinstance(request, dict) else None
            handler = self._ops.get(op) if isinstance(op, str) else None
            if handler is None:
                raise CniError(BAD_REQUEST, f"unknown op {op!r}")
            op_label = str(op)
            result = await handler(request, fds, follow_up)
            self.registry.server.metrics.cni_ops.labels(op_label, "ok").inc()
            log.info("event=cni op=%s device=%s container=%s result=ok", op,
                     request.get("deviceID", "-"), request.get("containerID", "-"))
            return {"ok": True, "result": result}
        except (CniError, NetnsError) as exc:
            e = exc if isinstance(exc, CniError) else CniError(
                NETNS_UNUSABLE, "the daemon cannot enter the pod's network namespace", str(exc))
            self.registry.server.metrics.cni_ops.labels(op_label, f"error_{e.code}").inc()
            log.warning("event=cni result=error code=%d msg=%r details=%r", e.code, e.msg,
                        e.details)
            return {"ok": False, "code": e.code, "msg": e.msg, "details": e.details}
        except Exception as e:
            self.registry.server.metrics.cni_ops.labels(op_label, "internal_error").inc()
            log.exception("event=cni_internal_error")
            return {"ok": False, "code": TRY_AGAIN, "msg": "internal error in the daemon",
                    "details": str(e)}


FOLLOW_UP_TIMEOUT = 90.0  # IPAM (DHCP, say) may take a while; the device waits in the pod


async def _follow_up(conn: socket.socket) -> dict[str, Any] | None:
    """The connection's next datagram as a JSON object; None if it is closed, times
    out, or holds anything else."""
    def recv() -> bytes:
        conn.settimeout(FOLLOW_UP_TIMEOUT)
        return conn.recv(MAX_REQUEST)
    try:
        data = await asyncio.to_thread(recv)
        msg = json.loads(data) if data else None
    except (OSError, ValueError):
        return None
    return msg if isinstance(msg, dict) else None
