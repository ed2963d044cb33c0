"""The registry's operations and views without root or a kernel: the real registry,
provisioner, handout server and state file, with the program table faked
(tests/fakes.py).  What the kernel does (attach, move) is in test_registry.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from cni_server.netns import Netns
from cni_server.programs import RegistryError
from cni_server.registry import Registry
from cni_server.server import HandoutServer
from cni_server.spec import AllocationSpec
from cni_server.state import StateFile
from tests.fakes import FakeProgramTable


def spec(base: Path, *netdevs: str, id: str = "a1") -> AllocationSpec:
    return AllocationSpec(id=id, netdevs=netdevs, hostnames=frozenset({"pod-a"}),
                          socket_base=base, mode=0o600)


def run(tmp_path: Path, body: Callable[[Registry, FakeProgramTable], Awaitable[Any]],
        table: FakeProgramTable | None = None) -> Any:
    table = table or FakeProgramTable()

    async def main() -> Any:
        server = HandoutServer()
        here = Netns.current()
        reg = Registry(server, here, table, StateFile(tmp_path / "state.json"))  # type: ignore[arg-type]
        try:
            return await body(reg, table)
        finally:
            await reg.shutdown(release=False)
            server.close()
            here.close()

    return asyncio.run(main())


def saved(tmp_path: Path) -> list[dict[str, Any]]:
    if not (tmp_path / "state.json").exists():
        return []
    records: list[dict[str, Any]] = json.loads((tmp_path / "state.json").read_text())[
        "allocations"]
    return records


def test_create_serves_records_and_saves_and_release_undoes_it_all(tmp_path: Path) -> None:
    base = tmp_path / "sock"
    base.mkdir()

    async def body(reg: Registry, table: FakeProgramTable) -> None:
        changed: list[str] = []
        reg.on_changed.append(changed.append)
        a = await reg.create(spec(base, "va", "vb"))
        assert (base / "va" / "afxdp.sock").is_socket() and (base / "vb" / "afxdp.sock").exists()
        assert [r["id"] for r in saved(tmp_path)] == ["a1"] and reg.by_netdev("vb") is a
        assert changed == ["va", "vb"]  # judged again once allocated
        await reg.release("a1")
        assert list(base.iterdir()) == [] and reg.allocations == {} and saved(tmp_path) == []
        assert ("release", "va", True) in table.calls and table.programs == {}
        assert changed == ["va", "vb"] * 2  # and again after the release

    run(tmp_path, body)


def test_a_create_that_fails_halfway_leaves_nothing_behind(tmp_path: Path) -> None:
    base = tmp_path / "sock"
    base.mkdir()

    async def body(reg: Registry, table: FakeProgramTable) -> None:
        await reg.create(spec(base, "vz", id="other"))
        before = saved(tmp_path)
        with pytest.raises(RegistryError, match="vb: refused"):
            await reg.create(spec(base, "va", "vb"))
        assert sorted(p.name for p in base.iterdir()) == ["vz"]  # va's directory went too
        assert list(reg.allocations) == ["other"] and saved(tmp_path) == before
        assert table.users == {"vz": 1}  # va's program reference was dropped

    run(tmp_path, body, FakeProgramTable(refuse={"vb"}))


def test_a_create_whose_state_cannot_be_saved_is_undone(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "sock"
    base.mkdir()

    def broken(self: StateFile, records: list[dict[str, Any]]) -> None:
        raise OSError(28, "No space left on device")

    async def body(reg: Registry, table: FakeProgramTable) -> None:
        monkeypatch.setattr(StateFile, "save", broken)
        with pytest.raises(OSError, match="No space left"):
            await reg.create(spec(base, "va"))
        assert list(base.iterdir()) == [] and reg.allocations == {} and table.programs == {}
        assert reg.server.listeners == {}

    run(tmp_path, body)


def test_readers_get_views_not_the_store(tmp_path: Path) -> None:
    base = tmp_path / "sock"
    base.mkdir()

    async def body(reg: Registry, table: FakeProgramTable) -> None:
        await reg.create(spec(base, "va"))
        with pytest.raises(TypeError):
            reg.allocations["x"] = reg.allocations["a1"]  # type: ignore[index]
        pod = Netns.current()  # stands for the pod's namespace
        record = {"netns": "/run/netns/pod", "ifname": "net1", "container_id": "c1"}
        await reg.attach("a1", "va", record, pod, "net1", 7)
        record["container_id"] = "changed by the caller afterwards"
        got = reg.attachment("va")
        assert got == {"netns": "/run/netns/pod", "ifname": "net1", "container_id": "c1"}
        got["ifname"] = "tampered"
        reg.spec("a1").attached["va"]["ifname"] = "tampered"
        assert reg.attachment("va") == {"netns": "/run/netns/pod", "ifname": "net1",
                                        "container_id": "c1"}
        assert list(reg.attachments()) == [("va", got | {"ifname": "net1"})]
        assert saved(tmp_path)[0]["attached"]["va"]["ifname"] == "net1"
        assert reg.allocations["a1"].resolve("net1") == "va"  # the pod's name works
        assert ("relocate", "va", "net1", 7) in table.calls

    run(tmp_path, body)
