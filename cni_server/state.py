"""The daemon's persisted state: one JSON file, replaced atomically.

A write goes to a temporary file in the same directory, is fsynced, renamed
over the old file, and the directory is fsynced: a crash or a full disk leaves
either the old state or the new one, never a mix.  A file that cannot be read
is set aside (``state.json.corrupt-<time>``) so that the daemon can start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
VERSION = 1


class StateError(Exception):
    """State cannot be written (the previous state is still intact)."""


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
            if not isinstance(doc, dict) or doc.get("version") != VERSION:
                found = doc.get("version") if isinstance(doc, dict) else doc
                raise ValueError(f"unknown state version {found!r}")
            records = doc["allocations"]
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise ValueError("'allocations' is not a list of objects")
        except (ValueError, KeyError) as e:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            self.path.replace(aside)
            log.error("event=state_unreadable path=%s error=%r moved_to=%s", self.path, str(e), aside)
            return []
        return records

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
        data = json.dumps({"version": VERSION, "allocations": records}, indent=1).encode()
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
