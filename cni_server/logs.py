"""Logging set-up: one line per event, key=value (default) or JSON, never colours.

Logs are evidence, and much of what they record comes from outside (a client's
hostname and requests, a CNI config's device and container id, kernel error
text).  So no value may forge a field or a line:

- every argument of a log call (``log.info("event=x netdev=%s", name)``) that is
  not a number is escaped by :func:`esc`: a bare token when it is made of safe
  characters only, else a double-quoted JSON string (quotes, ``=``, spaces,
  control and non-ASCII characters all escaped);
- a message built in advance (the handshake line) escapes its values itself,
  with :func:`esc` and :func:`esc_token`;
- as a last guard, any control character left in a finished key=value line is
  escaped, so one record is always one line.  JSON output is escaped by JSON.

Lines go to stderr through :class:`LogOutput`.  Under Kubernetes that is a pipe
the container runtime reads and writes to disk; when the runtime falls behind
(a busy disk), a plain write would hold up the daemon's event loop, and with it
every pod's handshakes, until the pipe has room again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import select
import stat
import threading
import time
from typing import Any
from urllib.parse import quote

_BARE = re.compile(r"[A-Za-z0-9._:/@+,\-]+")
_TOKEN = re.compile(r"[A-Za-z0-9._:@+\-]*")  # what quote() would leave as it is
_CONTROL = {i: f"\\x{i:02x}" for i in [*range(0x20), 0x7F]}


def esc(value: object) -> str:
    """A log value that cannot break out of its field: bare when safe, else quoted."""
    text = str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text)


def esc_token(value: object) -> str:
    """Percent-encoding for a piece of a composite value (e.g. a step's argument in
    ``steps=/verb(arg)=result,...``): no space, quote, ``=``, ``,`` or paren survives."""
    text = str(value)
    return text if _TOKEN.fullmatch(text) else quote(text, safe="._:@+-")


class _Escaped(str):
    """An escaped argument: ``%s`` and ``%r`` both give the escaped text."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str.__str__(self)


def _escape_arg(arg: Any) -> Any:
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return arg
    return _Escaped(esc(arg))


def message(record: logging.LogRecord) -> str:
    """The record's message with every argument escaped."""
    msg = str(record.msg)
    args = record.args
    if not args:
        return msg
    if isinstance(args, tuple):
        return msg % tuple(_escape_arg(a) for a in args)
    return msg % {k: _escape_arg(v) for k, v in args.items()}


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=... logger=... <message>``; the message is already key=value."""

    _second = -1
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # one strftime per second, not per line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        line = (f"ts={self._stamp}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
                f"logger={record.name} {message(record)}")
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line.translate(_CONTROL)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": message(record),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


class LogOutput:
    """Log lines for one fd (stderr), in order, none dropped.

    Written at once while the reader keeps up.  Once :meth:`attach` has given it
    an event loop, and when the fd is a pipe: what the pipe has no room for waits
    in memory, the caller goes on, and the loop writes it when the pipe has room.
    Past ``limit`` bytes waiting, a write waits for the reader, as a plain one
    would.  The loop's writes go through a non-blocking open file description of
    its own (``/proc/self/fd``): the fd's own stays blocking for anyone else."""

    def __init__(self, fd: int, limit: int = 8 << 20) -> None:
        self.fd = fd
        self.limit = limit
        self._nonblocking = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting = bytearray()
        self._lock = threading.Lock()  # loggers in any thread; the loop's writes

    @property
    def waiting(self) -> int:
        """Bytes written by loggers that the pipe has not taken yet."""
        return len(self._waiting)

    def attach(self, loop: asyncio.AbstractEventLoop) -> bool:
        """From now on, never block on a full pipe (called on ``loop``).  False: not
        a pipe (a file, a terminal, a socket), written as before."""
        self.detach()  # a loop before this one (a daemon started again in one process)
        try:
            if not stat.S_ISFIFO(os.fstat(self.fd).st_mode):
                return False
            nonblocking = os.open(f"/proc/self/fd/{self.fd}",
                                  os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False
        with self._lock:
            self._nonblocking, self._loop = nonblocking, loop
        return True

    def detach(self) -> None:
        """Blocking writes again, after what waits (called on the loop, or once it
        is gone)."""
        with self._lock:
            fd, loop = self._nonblocking, self._loop
            self._nonblocking, self._loop = -1, None
            self._write_waiting()
        if fd >= 0:
            if loop is not None and not loop.is_closed():
                loop.remove_writer(fd)
            os.close(fd)

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._nonblocking < 0:
                self._write_all(data)
            elif self._waiting:  # after what waits: one order
                self._waiting += data
                if len(self._waiting) > self.limit:
                    self._write_waiting()
            else:
                try:
                    done = os.write(self._nonblocking, data)
                except BlockingIOError:
                    done = 0
                if done < len(data):
                    self._waiting += data[done:]
                    assert self._loop is not None
                    try:
                        self._loop.call_soon_threadsafe(self._watch)
                    except RuntimeError:  # the loop has ended: at the reader's pace
                        self._write_waiting()

    def _watch(self) -> None:
        with self._lock:
            if self._waiting and self._loop is not None:
                self._loop.add_writer(self._nonblocking, self._writable)

    def _writable(self) -> None:
        with self._lock:
            try:
                done = os.write(self._nonblocking, self._waiting) if self._waiting else 0
            except BlockingIOError:
                return
            except OSError:  # the reader is gone: nothing more can be written
                done = len(self._waiting)
            del self._waiting[:done]
            if not self._waiting and self._loop is not None:
                self._loop.remove_writer(self._nonblocking)

    def _write_waiting(self) -> None:
        """(Under the lock) what waits, through the blocking fd: the reader's pace."""
        data, self._waiting = bytes(self._waiting), bytearray()
        self._write_all(data)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:  # someone else made the fd non-blocking
                select.select([], [self.fd], [])
            except OSError:
                return  # no reader: as with a plain stream, the lines are lost


class LineHandler(logging.Handler):
    """A logging handler: one formatted line per record into a :class:`LogOutput`."""

    def __init__(self, output: LogOutput) -> None:
        super().__init__()
        self.output = output

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.output.write((self.format(record) + "\n").encode("utf-8", "backslashreplace"))
        except Exception:
            self.handleError(record)


_output = LogOutput(2)


def follow_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Log lines stop holding up ``loop`` on a full stderr pipe (see LogOutput)."""
    _output.attach(loop)


def waiting_bytes() -> int:
    """Log bytes waiting for room in the stderr pipe (a metric)."""
    return _output.waiting


def unfollow_loop() -> None:
    """Blocking log writes again (the loop is about to end)."""
    with contextlib.suppress(OSError):
        _output.detach()


def setup(level: str = "info", fmt: str = "kv") -> None:
    # The daemon logs a line per handshake; skip what we never print (see the
    # "Optimization" section of the logging docs): caller lookup, thread and
    # process names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = LineHandler(_output)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # libbpf's debug chatter is only useful when asked for explicitly.
    logging.getLogger("bpf.libbpf").setLevel(max(root.level, logging.INFO))
