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
"""

from __future__ import annotations

import json
import logging
import re
import sys
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


def setup(level: str = "info", fmt: str = "kv") -> None:
    # The daemon logs a line per handshake; skip what we never print (see the
    # "Optimization" section of the logging docs): caller lookup, thread and
    # process names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # libbpf's debug chatter is only useful when asked for explicitly.
    logging.getLogger("bpf.libbpf").setLevel(max(root.level, logging.INFO))
