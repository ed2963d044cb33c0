"""The node daemon's one lifecycle, with a front end that records what it is asked:
no root, no kernel.  (The two real front ends run end to end in test_daemon.py and
test_plugin.py.)"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from cni_server import tuning
from cni_server.config import NodeSettings
from cni_server.control import call
from cni_server.node import NodeDaemon
from tests.fakes import fake_sysfs


class RecordingFront:
    mode = "test"
    release_on_stop = True
    fd_headroom = 16
    force_replace = False
    warm_programs = 0

    def __init__(self, fail_in: str = "") -> None:
        self.calls: list[str] = []
        self.fail_in = fail_in
        self.registered = False

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail_in:
            raise RuntimeError(f"{name} failed")

    def claim_facts(self) -> dict[str, str]:
        return {"sockets": "/nowhere"}

    def idle_timeout(self) -> float:
        return 7.0

    async def prepare(self, node: NodeDaemon) -> None:
        assert node.registry is None and node.netns is not None
        self._call("prepare")

    def registry_parts(self) -> tuple[None, None]:
        self._call("registry_parts")
        return None, None

    async def start(self, node: NodeDaemon) -> None:
        assert node.registry is not None
        self._call("start")

    async def stop(self, node: NodeDaemon) -> None:
        self._call("stop")

    async def cleanup(self, node: NodeDaemon) -> None:
        self._call("cleanup")

    def ready(self) -> tuple[bool, str]:
        return self.registered, "not registered yet"

    def status(self, node: NodeDaemon) -> dict[str, Any]:
        return {"front": "recording"}

    def ready_line(self, node: NodeDaemon) -> str:
        return "front=recording"


def _settings(tmp_path: Path) -> NodeSettings:
    return NodeSettings(control_socket=tmp_path / "control.sock",
                        ready_file=tmp_path / "ready.json", max_connections=50,
                        max_connections_per_socket=5, handshake_spin_us=0)


def test_the_front_end_is_called_in_order_and_the_core_serves_status(tmp_path: Path) -> None:
    front = RecordingFront()
    node = NodeDaemon(_settings(tmp_path), front)
    limits = node.server.limits
    assert (limits.idle_timeout, limits.max_connections, limits.max_connections_per_socket,
            limits.handshake_spin) == (7.0, 50, 5, 0)

    async def scenario() -> dict[str, Any]:
        await node.start()
        assert node.ready() == (False, "not registered yet")
        front.registered = True
        assert node.ready() == (True, "not registered yet")
        reply = await asyncio.to_thread(call, tmp_path / "control.sock",
                                        {"op": "status"})
        await node.stop()
        assert node.ready() == (False, "starting")
        return reply

    reply = asyncio.run(scenario())
    assert front.calls == ["prepare", "registry_parts", "start", "stop", "cleanup"]
    status = reply["status"]
    assert (status["mode"], status["front"], status["allocations"]) == ("test", "recording", [])
    assert not (tmp_path / "ready.json").exists() and not (tmp_path / "control.sock").exists()


@pytest.mark.parametrize("fail_in", ["prepare", "start"])
def test_a_failed_start_is_undone_and_raised(tmp_path: Path, fail_in: str) -> None:
    front = RecordingFront(fail_in=fail_in)
    node = NodeDaemon(_settings(tmp_path), front)
    with pytest.raises(RuntimeError, match=f"{fail_in} failed"):
        asyncio.run(node.start())
    assert front.calls[-2:] == ["stop", "cleanup"]
    assert node.netns is None and not (tmp_path / "ready.json").exists()


def test_the_ready_file_holds_the_status(tmp_path: Path) -> None:
    node = NodeDaemon(_settings(tmp_path), RecordingFront())

    async def scenario() -> dict[str, Any]:
        await node.start()
        try:
            doc: dict[str, Any] = json.loads((tmp_path / "ready.json").read_text())
            return doc
        finally:
            await node.stop()

    doc = asyncio.run(scenario())
    assert doc["mode"] == "test" and doc["front"] == "recording"


def test_start_up_garbage_is_collected_soon_after_ready_and_the_rest_frozen(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    import cni_server.node as node_mod
    monkeypatch.setattr(node_mod, "SETTLE_AFTER", 0.05)
    node = NodeDaemon(_settings(tmp_path), RecordingFront())

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    async def scenario() -> tuple[int, int, bool]:
        await node.start()
        gc.unfreeze()
        Cycle()  # start-up's kind of garbage: a cycle only the collector frees
        frozen_at_ready = gc.get_freeze_count()
        await asyncio.sleep(0.3)
        frozen_after = gc.get_freeze_count()
        garbage_left = any(isinstance(o, Cycle) for o in gc.get_objects())
        await node.stop()
        return frozen_at_ready, frozen_after, garbage_left

    try:
        at_ready, after, garbage_left = asyncio.run(scenario())
    finally:
        gc.unfreeze()
    assert at_ready == 0 and after > 0 and not garbage_left


def test_a_daemon_stopped_before_settling_does_not_settle(tmp_path: Path) -> None:
    import gc
    node = NodeDaemon(_settings(tmp_path), RecordingFront())

    async def scenario() -> None:
        await node.start()
        await node.stop()
        await asyncio.sleep(0.7)

    gc.unfreeze()
    try:
        asyncio.run(scenario())
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


def test_claims_taken_before_a_failed_start_are_given_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cni_server.netns import Netns
    from cni_server.ownership import Claims

    monkeypatch.setenv("AFXDP_RUN_DIR", str(tmp_path / "run"))

    class ClaimingFront(RecordingFront):
        async def prepare(self, node: NodeDaemon) -> None:
            assert node.claims is not None
            node.claims.take("va")  # as the standalone front claims its netdevs
            raise RuntimeError("prepare failed")

    node = NodeDaemon(_settings(tmp_path), ClaimingFront())
    with pytest.raises(RuntimeError, match="prepare failed"):
        asyncio.run(node.start())
    # In the failed daemon's netns, the claim must be free again.
    here = Netns.current()
    try:
        other = Claims(here.inode, {"pid": 1})
        other.take("va")  # NetdevBusy if the failed start still held it
        other.close()
    finally:
        here.close()


def test_start_up_logs_the_node_tuning_hints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    sysfs = fake_sysfs(tmp_path / "sys", "haltpoll", "0")
    monkeypatch.setattr(tuning, "SYSFS", sysfs)
    node = NodeDaemon(_settings(tmp_path), RecordingFront())

    async def scenario() -> None:
        await node.start()
        await node.stop()

    with caplog.at_level(logging.INFO, logger="cni_server.tuning"):
        asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records if r.name == "cni_server.tuning"]
    assert len(lines) == 1
    assert lines[0].startswith("event=tuning_hint hint=guest_halt_poll_off cpuidle_driver=haltpoll "
                               "guest_halt_poll_ns=0 ")
    assert lines[0].endswith(" see=docs/troubleshooting.md")
