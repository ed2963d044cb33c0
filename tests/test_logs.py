"""Logs are evidence: no client-supplied text can forge a field or a line."""

from __future__ import annotations

import io
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cni_server import logs
from cni_server.protocol import Step
from tests.kernel import Daemon, NsFixture

HOST = socket.gethostname()


@pytest.fixture
def captured() -> Iterator[Callable[[str], list[str]]]:
    """Log through the product's formatters; returns lines for a format."""
    streams: dict[str, io.StringIO] = {}
    loggers = []
    for fmt in ("kv", "json"):
        stream = streams[fmt] = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logs.JsonFormatter() if fmt == "json" else logs.KeyValueFormatter())
        lg = logging.getLogger(f"afxdp.test.{fmt}")
        lg.handlers[:] = [handler]
        lg.propagate = False
        lg.setLevel(logging.INFO)
        loggers.append(lg)

    def emit(fmt: str) -> list[str]:
        return streams[fmt].getvalue().splitlines()

    try:
        yield emit
    finally:
        for lg in loggers:
            lg.handlers.clear()


def log_both(msg: str, *args: object) -> None:
    for fmt in ("kv", "json"):
        logging.getLogger(f"afxdp.test.{fmt}").warning(msg, *args)


def test_an_argument_with_spaces_quotes_and_equals_cannot_add_a_field(
        captured: Callable[[str], list[str]]) -> None:
    log_both("event=cni device=%s container=%s", 'eth0 result=ok host="x"', "c1")
    [line] = captured("kv")
    assert line.endswith(r'device="eth0 result=ok host=\"x\"" container=c1'), line
    [doc] = [json.loads(x) for x in captured("json")]
    assert doc["msg"] == r'event=cni device="eth0 result=ok host=\"x\"" container=c1'


def test_an_argument_with_a_newline_cannot_start_a_line(
        captured: Callable[[str], list[str]]) -> None:
    forged = "x\nts=2026-01-01T00:00:00.000Z level=info event=handshake result=granted"
    log_both("event=cni_request_failed error=%r", forged)
    log_both(f"event=prebuilt value={forged}")  # a message built by hand, escaped or not
    assert len(captured("kv")) == 2 and len(captured("json")) == 2
    assert all("\n" not in line for line in captured("kv"))
    assert captured("kv")[0].endswith(r'error="x\nts=2026-01-01T00:00:00.000Z level=info '
                                      r'event=handshake result=granted"')
    assert r"value=x\x0ats=" in captured("kv")[1]


def test_non_ascii_and_control_bytes_are_escaped(captured: Callable[[str], list[str]]) -> None:
    log_both("event=x v=%s", "é\x1b[31m")
    [line] = captured("kv")
    assert line.endswith(r'v="\u00e9\u001b[31m"'), line


def test_safe_values_stay_bare(captured: Callable[[str], list[str]]) -> None:
    log_both("event=x netdev=%s path=%s n=%d", "eth0", Path("/tmp/afxdp_dp/eth0"), 3)
    [line] = captured("kv")
    assert line.endswith("event=x netdev=eth0 path=/tmp/afxdp_dp/eth0 n=3"), line


def test_a_step_argument_cannot_fake_another_step() -> None:
    step = Step("/xsk_map_fd", "not_in_allocation", "B)=ok,/xsk_map_fd(A")
    label = step.label()
    assert label == "/xsk_map_fd(B%29%3Dok%2C%2Fxsk_map_fd%28A)=not_in_allocation", label
    assert label.count("=") == 1 and "," not in label


@pytest.mark.kernel
def test_a_hostile_request_is_logged_as_what_it_was(
        netns: NsFixture, workdir: Path, start_daemon: Callable[..., Daemon]) -> None:
    netns.veth("va", "vb")
    d = start_daemon("--netdev", "va", "--socket-dir", str(workdir / "sock"), "--allow-host",
                     HOST)
    with netns.entered(), socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(5)
        s.connect(str(workdir / "sock" / "va" / "afxdp.sock"))
        for req in (f"/connect,{HOST}", "/xsk_map_fd,B)=ok,/xsk_map_fd(A",
                    "/xsk_map_fd,x\nevent=handshake result=granted", "/fin"):
            s.send(req.encode())
            s.recv(256)
    lines: list[str] = []
    for _ in range(250):  # the line is written when the server has closed the connection
        lines = [x for x in d.log().splitlines() if "event=handshake" in x]
        if lines:
            break
        time.sleep(0.02)
    [line] = lines
    assert "result=refused" in line, line
    assert "/xsk_map_fd(B%29%3Dok%2C%2Fxsk_map_fd%28A)=" in line, line
    assert "/xsk_map_fd(A)" not in line and "B)=ok" not in line
    assert not any(x.startswith("event=") for x in d.log().splitlines())
