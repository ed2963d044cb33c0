"""What both daemons (standalone and Kubernetes) do around their work: run until a
signal, report readiness, raise the fd limit, stop their background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


async def run_until_signal(start: Callable[[], Awaitable[None]],
                           stop: Callable[[], Awaitable[None]], stopping: asyncio.Event) -> None:
    """start(); wait for SIGTERM/SIGINT (or ``stopping``); stop() in any case."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await start()
    try:
        await stopping.wait()
        log.info("event=stopping reason=signal")
    finally:
        await stop()


async def cancel_tasks(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel ``tasks`` (None: skipped) and wait until each has ended."""
    live = [t for t in tasks if t is not None]
    for t in live:
        t.cancel()
    for t in live:
        with contextlib.suppress(asyncio.CancelledError):
            await t


def report_ready(ready_file: Path | None, status: dict[str, Any]) -> None:
    """Write the status JSON atomically to ``ready_file`` (if any), tell systemd."""
    if ready_file is not None:
        tmp = ready_file.with_name(ready_file.name + ".tmp")
        tmp.write_text(json.dumps(status))
        tmp.replace(ready_file)
    sd_notify(b"READY=1")


def raise_fd_limit(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def sd_notify(message: bytes) -> None:
    """Tell systemd (Type=notify) we are ready, when it asked us to."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message, addr)
