"""The daemon's persisted state: one JSON file, replaced atomically.

A write goes to a temporary file in the same directory, is fsynced, renamed
over the old file, and the directory is fsynced: a crash or a full disk leaves
either the old state or the new one, never a mix.  A file that cannot be read
is set aside (``state.json.corrupt-<time>``) so that the daemon can start.

The daemon writes through a :class:`StateWriter`: off its event loop, since an
fsync may take milliseconds (or, on a node pulling images, far longer) and the
loop serves every pod's handshakes meanwhile.

The document carries its schema ``version``.  One an older release wrote is
brought up to date, one step at a time, by ``MIGRATIONS``; one a newer release
wrote (a downgrade) stops the daemon with StateTooNew and is left untouched: this
release would drop what it does not understand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
VERSION = 1
# MIGRATIONS[n] turns a version-n document into a version n+1 one.  Raise VERSION
# with every change to what a record holds, and add the step here (with a test).
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


class StateError(Exception):
    """State cannot be written (the previous state is still intact)."""


class StateTooNew(StateError):
    """The state was written by a newer release; nothing was changed."""


class StateFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[dict[str, Any]]:
        """The saved allocation records; [] when there is no state yet."""
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return []
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            doc = self._upgrade(doc)
            records = doc["allocations"]
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise ValueError("'allocations' is not a list of objects")
        except (ValueError, KeyError) as e:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            self.path.replace(aside)
            log.error("event=state_unreadable path=%s error=%r moved_to=%s", self.path, str(e), aside)
            return []
        return records

    def _upgrade(self, doc: dict[str, Any]) -> dict[str, Any]:
        """``doc`` at this release's VERSION; ValueError when it has no known version."""
        version = doc.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"unknown state version {version!r}")
        if version > VERSION:
            raise StateTooNew(
                f"{self.path} was written by a newer afxdp (state version {version}; this "
                f"one reads up to {VERSION}); it is left as it is: run the newer daemon, or "
                "move the file aside to start with no allocations")
        while version < VERSION:
            step = MIGRATIONS.get(version)
            if step is None:
                raise ValueError(f"unknown state version {version!r}")
            doc = step(doc)
            if doc.get("version") != version + 1:
                raise ValueError(f"migrating state version {version} did not give "
                                 f"{version + 1}")
            log.info("event=state_migrated from=%d to=%d path=%s", version, version + 1,
                     self.path)
            version += 1
        return doc

    def set_aside(self, records: list[dict[str, Any]], why: str) -> Path:
        """Keep records the daemon will not use (e.g. refused at restore) beside the
        state, for the operator: ``<state>.<why>-<time>``, mode 0600."""
        aside = self.path.with_name(f"{self.path.name}.{why}-{int(time.time())}")
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": VERSION, "allocations": records}, f, indent=1)
        log.warning("event=state_records_set_aside count=%d path=%s", len(records), aside)
        return aside

    def save(self, records: list[dict[str, Any]]) -> None:
        # No indent: json's C encoder serves only compact output, and this file is
        # written on every change of every allocation (read it with jq).
        data = json.dumps({"version": VERSION, "allocations": records}).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StateError(f"cannot write state {self.path}: {e.strerror or e} "
                             "(the previous state is intact)") from e


class StateWriter:
    """Saves for an event loop: the file is written in a thread of its own, one
    write at a time, so the loop goes on serving meanwhile.

    ``save()`` returns once the state as it was when it was called is on disk, or
    raises StateError.  Saves asked for while a write is under way are served by
    one write after it, of the newest state (it carries all of their changes)."""

    def __init__(self, state: StateFile, records: Callable[[], list[dict[str, Any]]]) -> None:
        self.state = state
        self._records = records
        self._asked = self._written = 0
        self._closed = False
        self._lock = asyncio.Lock()
        # One worker: writes never overlap, and go to disk in the order they were
        # taken, even when a waiter is cancelled while its write goes on.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-writer")

    async def save(self) -> None:
        self._asked += 1
        mine = self._asked
        async with self._lock:
            if self._written >= mine:
                return  # a write since our call carried our change
            taken = self._asked
            records = self._records()
            try:
                if self._closed:
                    raise RuntimeError("closed")
                writing = asyncio.get_running_loop().run_in_executor(
                    self._executor, self.state.save, records)
            except RuntimeError:  # closed (here, or by close() in its thread meanwhile)
                raise StateError(f"cannot write state {self.state.path}: the daemon is "
                                 "stopping") from None
            await asyncio.shield(writing)
            self._written = taken

    def close(self) -> None:
        """Wait for a write under way; no more after it."""
        self._closed = True
        self._executor.shutdown(wait=True)
