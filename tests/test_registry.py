"""The allocation registry on the real kernel: all-or-nothing create, release, persist, restore."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from bpf import bpffs, libbpf
from cni_server.client import HandshakeError, fetch_map_fd
from cni_server.netdev import link_info
from cni_server.netns import Netns
from cni_server.programs import ProgramTable, RegistryError
from cni_server.registry import Registry
from cni_server.server import HandoutServer
from cni_server.spec import AllocationSpec
from cni_server.state import StateError, StateFile
from tests.kernel import NsFixture, run

pytestmark = pytest.mark.kernel
T = TypeVar("T")
HOST = socket.gethostname()


def run_in(ns: NsFixture, body: Callable[[Registry], Awaitable[T]], state: Path | None = None,
           *, release: bool = True) -> T:
    """Run ``body`` with a fresh registry inside the netns, then shut it down."""

    async def main() -> T:
        with Netns.current() as here:
            server = HandoutServer()
            reg = Registry(server, here, ProgramTable(), StateFile(state) if state else None)
            try:
                return await body(reg)
            finally:
                await reg.shutdown(release=release)
                server.close()

    with ns.entered():
        return asyncio.run(main())


def spec(base: Path, *netdevs: str, **kw: object) -> AllocationSpec:
    return AllocationSpec(id=str(kw.pop("id", "a1")), netdevs=netdevs, hostnames=frozenset({HOST}),
                          socket_base=base, own_socket_base=True, **kw)  # type: ignore[arg-type]


def test_one_allocation_two_devices_serves_a_socket_per_device(netns: NsFixture, tmp_path: Path
                                                               ) -> None:
    netns.veth("va", "vb")
    netns.veth("vc", "vd")
    base = tmp_path / "a1"

    async def body(reg: Registry) -> None:
        a = await reg.create(spec(base, "va", "vc"))
        assert a.socket_paths == (base / "va" / "afxdp.sock", base / "vc" / "afxdp.sock")
        for path in a.socket_paths:  # either socket hands out either netdev
            for netdev in ("va", "vc"):
                (await asyncio.to_thread(fetch_map_fd, path, netdev)).close()
        assert netns.xdp_prog_id("va") and netns.xdp_prog_id("vc")
        await reg.release("a1")
        assert not base.exists()
        assert netns.xdp_prog_id("va") == 0 and netns.xdp_prog_id("vc") == 0

    run_in(netns, body)


def test_an_unavailable_device_is_refused_until_it_is_recorded_where_it_is(
        netns: NsFixture, tmp_path: Path) -> None:
    """The stale-map guard: no map for a device marked unavailable; recording a move
    (CNI ADD/DEL) clears the mark and tells the health judge to look again."""
    netns.veth("va", "vb")
    base = tmp_path / "a1"

    async def body(reg: Registry) -> None:
        moved: list[str] = []
        reg.on_changed.append(moved.append)
        a = await reg.create(spec(base, "va"))
        moved.clear()  # (creating it has health judged too)
        a.netdevs["va"].unavailable = "netdev is gone"
        with pytest.raises(HandshakeError, match="/fd_nak"):
            await asyncio.to_thread(fetch_map_fd, a.socket_paths[0], "va")
        info = await asyncio.to_thread(link_info, "va")
        await reg._moved("a1", "va", None, None, "va", info.ifindex)  # as CNI DEL records it
        assert moved == ["va"] and a.netdevs["va"].unavailable == ""
        (await asyncio.to_thread(fetch_map_fd, a.socket_paths[0], "va")).close()
        await reg.release("a1")  # and a release has health judged again too
        assert moved == ["va", "va"]

    run_in(netns, body)


def test_failure_half_way_leaves_nothing(netns: NsFixture, tmp_path: Path) -> None:
    netns.veth("va", "vb")
    base = tmp_path / "a1"

    async def body(reg: Registry) -> None:
        with pytest.raises(LookupError, match="nosuch0"):
            await reg.create(spec(base, "va", "nosuch0"))
        assert not reg.allocations and not base.exists()
        assert netns.xdp_prog_id("va") == 0

    run_in(netns, body)


def test_a_netdev_cannot_be_in_two_allocations(netns: NsFixture, tmp_path: Path) -> None:
    netns.veth("va", "vb")

    async def body(reg: Registry) -> None:
        await reg.create(spec(tmp_path / "a1", "va"))
        with pytest.raises(RegistryError, match="already in allocation a1"):
            await reg.create(spec(tmp_path / "a2", "va", id="a2"))
        assert not (tmp_path / "a2").exists()

    run_in(netns, body)


def test_program_stays_while_another_allocation_uses_the_netdev(netns: NsFixture, tmp_path: Path
                                                                ) -> None:
    netns.veth("va", "vb")

    async def body(reg: Registry) -> None:
        await reg.create(spec(tmp_path / "a1", "va"))
        prog = netns.xdp_prog_id("va")
        await reg.release("a1")
        assert netns.xdp_prog_id("va") == 0  # nothing uses it any more
        await reg.create(spec(tmp_path / "a1", "va"))
        assert netns.xdp_prog_id("va") not in (0, prog)  # a fresh copy

    run_in(netns, body)


def test_pins_and_pin_placeholder(netns: NsFixture, tmp_path: Path) -> None:
    netns.veth("va", "vb")
    pins = tmp_path / "bpf"
    mount = bpffs.ensure_bpffs(pins)
    try:
        async def body(reg: Registry) -> None:
            s = spec(tmp_path / "a1", "va", pin_base=pins / "a1", pin_placeholder=True, uid=65534,
                     gid=65534)
            a = await reg.create(s)
            pin = pins / "a1" / "va" / "xsks_map"
            assert a.netdevs["va"].pin == pin and os.stat(pin).st_uid == 65534
            fd = bpffs.open_pinned(pin)
            try:
                assert libbpf.map_info(fd).id == a.netdevs["va"].program.program.map_id
            finally:
                os.close(fd)
            assert (tmp_path / "a1" / "va" / "xsks_map").is_file()  # where the pin is mounted
            await reg.release("a1")
            assert not pin.exists() and not (pins / "a1").exists()

        run_in(netns, body)
    finally:
        assert mount is not None
        bpffs.unmount(mount)


def test_state_survives_a_restart_and_restore_reuses_paths_programs_and_maps(
        netns: NsFixture, tmp_path: Path) -> None:
    netns.veth("va", "vb", queues=2)
    state = tmp_path / "state" / "state.json"
    base = tmp_path / "a1"

    async def first(reg: Registry) -> tuple[int, int]:
        a = await reg.create(spec(base, "va", queues=1, pool="fast"))
        reg.set_owner("a1", "ns1/pod-a/c0", frozenset({"pod-a"}))
        return a.netdevs["va"].program.program.prog_id, a.netdevs["va"].program.program.map_id

    prog_id, map_id = run_in(netns, first, state, release=False)  # a daemon stop, not a release
    saved = json.loads(state.read_text())["allocations"]
    assert [r["id"] for r in saved] == ["a1"] and saved[0]["owner"] == "ns1/pod-a/c0"
    assert netns.xdp_prog_id("va") == prog_id  # kept attached for running pods

    async def second(reg: Registry) -> None:
        restored, dropped = await reg.restore()
        assert (restored, dropped) == (["a1"], [])
        a = reg.allocations["a1"]
        assert a.socket_paths == (base / "va" / "afxdp.sock",)
        assert (a.owner, a.hostnames_allowed, a.pool) == ("ns1/pod-a/c0", frozenset({"pod-a"}),
                                                          "fast")
        assert a.netdevs["va"].program.adopted
        assert a.netdevs["va"].program.program.map_id == map_id
        assert a.netdevs["va"].queue_count == 1
        a.hostnames_allowed = frozenset({HOST})
        (await asyncio.to_thread(fetch_map_fd, base / "va" / "afxdp.sock", "va")).close()
        await reg.release("a1")

    run_in(netns, second, state)
    assert json.loads(state.read_text())["allocations"] == []
    assert netns.xdp_prog_id("va") == 0


def test_restore_drops_allocations_whose_netdev_is_gone(netns: NsFixture, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    record = spec(tmp_path / "a1", "gone0").to_json()
    state.write_text(json.dumps({"version": 1, "allocations": [record]}))

    async def body(reg: Registry) -> None:
        assert await reg.restore() == ([], ["a1"])

    run_in(netns, body, state)
    assert json.loads(state.read_text())["allocations"] == []


def test_unreadable_state_is_set_aside_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("{not json")
    assert StateFile(path).load() == []
    assert not path.exists()
    assert len(list(tmp_path.glob("state.json.corrupt-*"))) == 1


@pytest.mark.kernel
def test_failed_state_write_keeps_the_old_state(tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    # A tmpfs of 4 KiB that already holds the old state: the new one cannot fit.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(full)], check=True)
    try:
        small = StateFile(full / "state.json")
        small.save([{"id": "old"}])
        with pytest.raises(StateError, match="previous state is intact"):
            small.save([{"id": "x" * 100, "pad": "y" * 8000}])
        assert json.loads((full / "state.json").read_text())["allocations"] == [{"id": "old"}]
        assert [p.name for p in full.iterdir()] == ["state.json"]
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_the_inventory_does_not_call_a_device_we_just_attached_unhealthy_on_a_stale_view(
        netns: NsFixture, tmp_path: Path) -> None:
    """The netlink view of a netdev can still show no program (or the old one) a
    moment after our attach returned: health must follow the kernel, not the lag."""
    from plugin.config import PluginConfig, PoolConfig
    from plugin.discovery import Netdev
    from plugin.inventory import Inventory

    netns.veth("va", "vb")

    async def body(reg: Registry) -> tuple[bool, bool]:
        await reg.create(spec(tmp_path / "s", "va"))
        inv = Inventory(PluginConfig(pools=[PoolConfig("pool1")]), reg, _no_change)
        ifindex = socket.if_nametoindex("va")
        stale = Netdev("va", ifindex, "", "veth", "veth", "", None, True, False, False, False,
                       0, "")  # the event of our attach not seen yet
        healthy_now = inv.health.of(stale, {}, {}).healthy
        run("ip", "-n", netns.name, "link", "set", "va", "xdp", "off")
        really_lost = inv.health.of(stale, {}, {}).healthy
        return healthy_now, really_lost

    healthy_now, really_lost = run_in(netns, body)
    assert healthy_now is True
    assert really_lost is False  # the kernel agrees it is gone: reported


async def _no_change(pools: set[str]) -> None:
    return None


def test_a_program_attached_ahead_is_taken_only_while_the_kernel_still_has_it_there(
        netns: NsFixture) -> None:
    """attachAhead's program is taken by the next acquire only when the kernel shows
    it still attached to that very netdev; one detached behind the daemon's back is
    let go, and the acquire attaches a fresh program."""
    from bpf.program import XdpMode
    from cni_server.programs import ProgramChoice

    netns.veth("va", "vb")
    netns.veth("vc", "vd")

    async def main() -> tuple[int, int, int, int]:
        table = ProgramTable()
        try:
            for name in ("va", "vc"):
                assert await table.attach_ahead(name, XdpMode.NATIVE, ProgramChoice())
            ahead_a, ahead_c = netns.xdp_prog_id("va"), netns.xdp_prog_id("vc")
            run("ip", "-n", netns.name, "link", "set", "vc", "xdp", "off")  # behind our back
            taken = await table.acquire("va", XdpMode.NATIVE, choice=ProgramChoice())
            fresh = await table.acquire("vc", XdpMode.NATIVE, choice=ProgramChoice())
            return (ahead_a, taken.program.prog_id, ahead_c, fresh.program.prog_id)
        finally:
            for name in ("va", "vc"):
                await table.release(name)
            await table.withdraw_ahead()

    with netns.entered():
        ahead_a, taken, ahead_c, fresh = asyncio.run(main())
    assert taken == ahead_a != 0
    assert fresh not in (0, ahead_c) and netns.xdp_prog_id("vc") == 0  # released: detached


class _HeldFile(StateFile):
    """A state file whose writes wait while ``hold`` is set."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.held = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.writes = 0

    def save(self, records: list[dict[str, object]]) -> None:
        self.writes += 1
        if not self.release.is_set():
            self.held.set()
            self.release.wait(10)
        super().save(records)


def test_a_device_brought_home_without_waiting_for_the_disk_is_recorded_right_after(
        netns: NsFixture, tmp_path: Path) -> None:
    """CNI DEL answers once the device is home; the state file follows, and a daemon
    that stops meanwhile writes it before it goes (here it waits behind another
    change's write)."""
    from tests.kernel import make_netns

    netns.veth("va", "vb")
    state = _HeldFile(tmp_path / "state.json")

    def attached() -> dict[str, object]:
        recorded: dict[str, object] = json.loads(state.path.read_text())["allocations"][0]
        return recorded["attached"]  # type: ignore[return-value]

    async def main(pod: NsFixture) -> tuple[bool, dict[str, object], bool]:
        with Netns.current() as here:
            server = HandoutServer()
            reg = Registry(server, here, ProgramTable(), state)
            try:
                await reg.create(spec(tmp_path / "s", "va"))
                run("ip", "link", "set", "va", "netns", pod.name)
                where = Netns.open(pod.path)
                ifindex = where.run(lambda: link_info("va").ifindex)
                await reg.attach("a1", "va", {"netns": str(pod.path), "ifname": "va"}, where,
                                 "va", ifindex)
                assert "va" in attached()
                state.release.clear()  # writes wait; one is under way, as another change's
                earlier = asyncio.ensure_future(reg.save())
                assert await asyncio.to_thread(state.held.wait, 10)
                await asyncio.wait_for(reg.bring_home("a1", "va", wait_for_disk=False), 10)
                home = "va" in {name for _index, name in socket.if_nameindex()}
                while_held = attached()
            finally:
                stopping = asyncio.ensure_future(reg.shutdown(release=False))
                await asyncio.sleep(0.2)
                waited = not stopping.done()  # for the write under way
                state.release.set()
                await stopping
                await earlier
                server.close()
            return home, while_held, waited

    with make_netns() as pod, netns.entered():
        home, while_held, waited = asyncio.run(main(pod))
    assert home and "va" in while_held  # answered before the file said so
    assert waited
    assert attached() == {}


def test_a_record_written_ahead_of_its_move_is_on_disk_only_and_not_written_twice(
        netns: NsFixture, tmp_path: Path) -> None:
    """CNI ADD writes its record while the kernel moves the device: the file has it,
    the views (attachments, what DEL and GC read) do not until attach(), which then
    writes nothing more; a move that failed takes it back off the disk."""
    netns.veth("va", "vb")
    netns.veth("vc", "vd")
    state = _HeldFile(tmp_path / "state.json")

    def on_disk() -> dict[str, object]:
        doc = json.loads(state.path.read_text())
        return {k: v for a in doc["allocations"] for k, v in a["attached"].items()}

    async def body(reg: Registry) -> None:
        await reg.create(spec(tmp_path / "s", "va", "vc"))
        record = {"netns": "/run/netns/pod", "ifname": "net1", "orig_mtu": "1500"}
        await reg.record_ahead("a1", "va", record)
        await reg.record_ahead("a1", "vc", {"netns": "/run/netns/pod", "ifname": "net2"})
        assert set(on_disk()) == {"va", "vc"}
        assert reg.attachment("va") is None and list(reg.attachments()) == []
        writes = state.writes
        # (Where it really is does not matter to the record: left where it is.)
        await reg.attach("a1", "va", record, Netns.current(), "va",
                         socket.if_nametoindex("va"), on_disk=True)
        assert state.writes == writes  # nothing written again
        assert reg.attachment("va") == record
        await reg.forget_ahead("vc")  # its move failed
        assert on_disk() == {"va": record}

    with netns.entered():
        async def main() -> None:
            with Netns.current() as here:
                server = HandoutServer()
                reg = Registry(server, here, ProgramTable(), state)
                try:
                    await body(reg)
                finally:
                    await reg.shutdown(release=False)
                    server.close()
        asyncio.run(main())


def test_an_allocation_is_written_while_it_is_built_and_taken_back_if_building_fails(
        netns: NsFixture, tmp_path: Path) -> None:
    """Allocate's record goes to disk while the kernel attaches (the write does not
    wait for the attach, nor the attach for the write); Allocate answers once both
    are done, and a build that fails leaves nothing on disk."""
    netns.veth("va", "vb")
    state = _HeldFile(tmp_path / "state.json")

    def ids_on_disk() -> list[str]:
        return [a["id"] for a in json.loads(state.path.read_text())["allocations"]]

    async def main() -> tuple[bool, bool, list[str], list[str]]:
        with Netns.current() as here:
            server = HandoutServer()
            reg = Registry(server, here, ProgramTable(), state)
            try:
                state.release.clear()
                creating = asyncio.ensure_future(reg.create(spec(tmp_path / "a1", "va")))
                assert await asyncio.to_thread(state.held.wait, 10)  # writing...
                for _ in range(1000):  # ...while the program goes on
                    if netns.xdp_prog_id("va"):
                        break
                    await asyncio.sleep(0.01)
                attached_during_write = bool(netns.xdp_prog_id("va"))
                answered_before_written = creating.done()
                state.release.set()
                await creating
                after_create = ids_on_disk()
                with pytest.raises(LookupError, match="nosuch0"):
                    await reg.create(spec(tmp_path / "a2", "vb", "nosuch0", id="a2"))
                after_failure = ids_on_disk()
            finally:
                state.release.set()
                await reg.shutdown(release=True)
                server.close()
        return attached_during_write, answered_before_written, after_create, after_failure

    with netns.entered():
        during, early, after_create, after_failure = asyncio.run(main())
    assert during and not early
    assert after_create == ["a1"]
    assert after_failure == ["a1"]


def test_background_work_waits_for_a_pods_move_not_for_a_quiet_spell_once_it_is_in(
        netns: NsFixture, tmp_path: Path) -> None:
    """Registry.wait_quiet (warm programs, attachAhead): while an allocation waits
    for its pod's CNI ADD, background attaches (which hold the rtnl lock the ADD's
    move needs) wait for a quiet spell; once every new allocation's pod has its
    device, they need not wait at all.  (A minute's spell: a wait that ends within
    seconds did not wait for it.)"""
    from tests.kernel import make_netns

    netns.veth("va", "vb")

    async def at_once(reg: Registry) -> bool:
        try:
            await asyncio.wait_for(reg.wait_quiet(60), 3)
        except TimeoutError:
            return False
        return True

    async def body(reg: Registry, pod: NsFixture) -> tuple[bool, bool, bool]:
        before = await at_once(reg)  # nothing has happened yet
        await reg.create(spec(tmp_path / "s", "va"))
        due = await at_once(reg)  # the ADD is due: the spell
        run("ip", "link", "set", "va", "netns", pod.name)
        where = Netns.open(pod.path)
        ifindex = where.run(lambda: link_info("va").ifindex)
        await reg.attach("a1", "va", {"netns": str(pod.path), "ifname": "va"}, where, "va",
                         ifindex)
        moved_in = await at_once(reg)  # just changed, but nothing is due
        await reg.bring_home("a1", "va")
        return before, due, moved_in

    with make_netns() as pod:
        before, due, moved_in = run_in(netns, lambda reg: body(reg, pod))
    assert (before, due, moved_in) == (True, False, True)
